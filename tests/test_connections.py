"""The HTTP server's deadlines on its clients, with raw sockets against the real server:
none may hold a connection (or the server) for longer than the configured timeouts."""

from __future__ import annotations

import trio

CAP = 60


async def connect(client):
    host, port = client.base_url.host, client.base_url.port
    return await trio.open_tcp_stream(host, port)


async def until_closed(stream, *, feed: bytes = b"", every: float = 0.2) -> bytes:
    """Read (sending ``feed`` every ``every`` seconds) until the server closes; what it
    sent meanwhile."""
    got = b""
    while True:
        if feed:
            try:
                await stream.send_all(feed)
            except trio.BrokenResourceError:
                return got
        with trio.move_on_after(every):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return got
            if not data:
                return got
            got += data


async def test_connection_close_is_honoured(start_server, make_config):
    with trio.fail_after(CAP):
        client = await start_server(make_config())
        stream = await connect(client)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status": "ok"}')


async def test_trickled_and_idle_connections_are_closed(start_server, make_config):
    """250 clients trickling their headers a byte at a time, and idle keep-alive ones: each
    is closed once header_timeout has passed, and the server serves others meanwhile."""
    with trio.fail_after(CAP):
        client = await start_server(make_config(header_timeout=2))
        trickled, idled = [], []

        async def trickler():
            stream = await connect(client)
            trickled.append(await until_closed(stream, feed=b"X", every=0.25))

        async def idler():
            stream = await connect(client)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            idled.append(await until_closed(stream))

        async with trio.open_nursery() as nursery:
            for _ in range(250):
                nursery.start_soon(trickler)
            nursery.start_soon(idler)
            # Served meanwhile, on a connection of its own.
            for _ in range(5):
                assert (await client.get("/healthz")).status_code == 200
        assert len(trickled) == 250  # each got nothing but its connection closed
        assert all(not answer.startswith(b"HTTP/1.1 2") for answer in trickled)
        (answer,) = idled  # answered, then closed once idle
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status": "ok"}')


async def test_a_trickled_body_is_refused(start_server, make_config):
    with trio.fail_after(CAP):
        client = await start_server(make_config(body_timeout=1))
        stream = await connect(client)
        await stream.send_all(b"POST /fn HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        answer = await until_closed(stream, feed=b" ", every=0.3)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert (await client.get("/fn?status=all")).json() == []


async def test_a_view_that_outlasts_body_timeout_runs_once(start_server, python_config,
                                                           images):
    """The body is read within body_timeout before the view runs; the view itself (a wait
    longer than that) is not: it runs once and answers."""
    with trio.fail_after(CAP):
        client = await start_server(python_config(body_timeout=1))
        r = await client.post("/fn?wait=20", json={"image": images.python,
                                                   "command": "sleep 2; echo done"})
        assert r.status_code == 200 and r.json()["stdout"] == "done\n", r.text
        assert len((await client.get("/fn?status=all")).json()) == 1


async def test_a_body_over_max_body_is_refused_however_it_comes(start_server, make_config):
    """In one piece, in pieces, or said in advance by its Content-Length: 413."""
    with trio.fail_after(CAP):
        client = await start_server(make_config(max_body=1024))
        body = b'{"image": "x", "command": "' + b"x" * 2000 + b'"}'
        r = await client.post("/fn", content=body)
        assert r.status_code == 413, r.text

        async def pieces():
            for i in range(0, len(body), 500):
                yield body[i:i + 500]

        r = await client.post("/fn", content=pieces())
        assert r.status_code == 413, r.text
        stream = await connect(client)
        await stream.send_all(b"POST /fn HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        answer = await until_closed(stream)  # answered without the body being sent
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert (await client.get("/fn?status=all")).json() == []


async def test_a_wrong_token_is_answered_before_the_body_is_read(start_server, make_config):
    """A request without the token gets its 401 without sending the body it announced."""
    with trio.fail_after(CAP):
        client = await start_server(make_config(token="s3cret"))
        stream = await connect(client)
        await stream.send_all(b"POST /fn HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        answer = await until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
        assert b"connection: close" in answer.lower()
