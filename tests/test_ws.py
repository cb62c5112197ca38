"""The WebSocket API at /fn/ws with real trio-websocket clients against the real server."""

from __future__ import annotations

import json
import socket
import time

import trio
from trio_websocket import open_websocket_url, wrap_client_stream

MAX_MESSAGE = 16 << 20


def ws_url(client, query: str = "") -> str:
    base = str(client.base_url).rstrip("/").replace("http://", "ws://", 1)
    return f"{base}/fn/ws{query}"


def connect(client, query: str = "", **kw):
    kw.setdefault("max_message_size", MAX_MESSAGE)
    kw.setdefault("connect_timeout", 10)
    kw.setdefault("disconnect_timeout", 5)
    return open_websocket_url(ws_url(client, query), **kw)


async def send(ws, **message) -> None:
    await ws.send_message(json.dumps(message))


async def receive(ws) -> dict:
    return json.loads(await ws.get_message())


async def run(ws, spec) -> str:
    await send(ws, op="run", spec=spec)
    created = await receive(ws)
    assert created["event"] == "created", created
    return created["id"]


async def until_exit(ws, fid, on_event=None) -> list[dict]:
    """Every event of ``fid`` up to and including its exit."""
    seen = []
    while True:
        event = await receive(ws)
        if event.get("id") != fid:
            continue
        seen.append(event)
        if on_event is not None:
            await on_event(event)
        if event["event"] == "exit":
            return seen


def text(events, stream="stdout") -> str:
    return "".join(e["data"] for e in events if e["event"] == stream)


async def until_output(ws, fid, wanted: tuple[str, str]) -> list[dict]:
    """Every event of ``fid`` until its stdout and stderr so far are ``wanted``."""
    seen: list[dict] = []
    while (text(seen), text(seen, "stderr")) != wanted:
        event = await receive(ws)
        if event.get("id") != fid:
            continue
        assert event["event"] != "exit", event
        seen.append(event)
        assert wanted[0].startswith(text(seen)) and wanted[1].startswith(text(seen, "stderr"))
    return seen


def py(images, code, **kw):
    return {"image": images.python, "command": ["python3", "-u", "-c", code], **kw}


async def test_first_line_is_live(start_server, python_config, images):
    code = "print('a'); import time; time.sleep(2); print('b')"
    with trio.fail_after(60):
        client = await start_server(python_config())
        async with connect(client) as runner, connect(client) as watcher:
            fid = await run(runner, py(images, code))
            await send(watcher, op="watch", id=fid)
            seen: list[tuple[float, dict]] = []

            async def stamp(event):
                seen.append((time.monotonic(), event))

            await until_exit(watcher, fid, stamp)
            by_runner = await until_exit(runner, fid)
    events = [e for _, e in seen]
    first_line = next(t for i, (t, _) in enumerate(seen) if text(events[:i + 1]) == "a\n")
    ended = next(t for t, e in seen if e["event"] == "exit")
    assert ended - first_line >= 1.5
    assert text(events) == text(by_runner) == "a\nb\n"
    assert [e["status"] for e in events if e["event"] == "status"][-1] == "succeeded"
    assert events[-1] == {"event": "exit", "id": fid, "status": "succeeded", "exit_code": 0,
                          "signal": None, "error": None}
    assert by_runner[0] == {"event": "status", "id": fid, "status": "pending"}
    # It streamed live as a function forked from its container's warm interpreter.
    assert (await client.get(f"/fn/{fid}")).json()["forked"] is True


def joined(events):
    """``events`` with each run of output events of one stream made one."""
    out = []
    for event in events:
        if out and "data" in event and out[-1]["event"] == event["event"]:
            out[-1] = {**out[-1], "data": out[-1]["data"] + event["data"]}
        else:
            out.append(event)
    return out


async def test_late_watchers_get_replay_then_the_rest(start_server, python_config, images):
    # Many small writes on both streams, over about two seconds; halfway the function waits
    # for a line of stdin, so a watcher joins with one half out and the other to come.
    code = ("import sys, time\n"
            "def write(lines):\n"
            "    for i in lines:\n"
            "        print(f'line {i} é', flush=True)\n"
            "        if i % 7 == 0: print(f'err {i}', file=sys.stderr, flush=True)\n"
            "        if i % 50 == 0: time.sleep(0.05)\n"
            "write(range(700))\n"
            "sys.stdin.readline()\n"
            "write(range(700, 1500))\n")

    def out(lines):
        return ("".join(f"line {i} é\n" for i in lines),
                "".join(f"err {i}\n" for i in lines if i % 7 == 0))

    expected, half = out(range(1500)), out(range(700))
    with trio.fail_after(60):
        client = await start_server(python_config())
        async with connect(client) as first, connect(client) as late:
            fid = await run(first, py(images, code))
            before = await until_output(first, fid, half)
            await send(late, op="watch", id=fid)
            replay = await until_output(late, fid, half)
            await send(first, op="stdin", id=fid, data="go\n")
            after_first = await until_exit(first, fid)
            after_late = await until_exit(late, fid)
        async with connect(client) as after:
            await send(after, op="watch", id=fid)
            afterwards = await until_exit(after, fid)
    # The late watcher got a replay of the first half, then the very events the first
    # watcher got from then on: nothing missed, nothing twice (a watcher that falls behind
    # gets consecutive output of one stream in fewer events: compared joined).
    assert replay[0] == {"event": "status", "id": fid, "status": "running"}
    assert joined(after_late) == joined(after_first)
    for events in (before + after_first, replay + after_late, afterwards):
        assert (text(events), text(events, "stderr")) == expected
        assert events[-1]["status"] == "succeeded"
    # A finished function replays its final status, output and exit.
    assert afterwards[0] == {"event": "status", "id": fid, "status": "succeeded"}
    record = (await client.get(f"/fn/{fid}")).json()
    assert record["stdout"] == expected[0]


async def test_interactive_stdin(start_server, python_config, images):
    code = ("import sys\n"
            "print('ready')\n"
            "while True:\n"
            "    line = sys.stdin.readline()\n"
            "    if not line: break\n"
            "    print('echo:' + line.strip().upper())\n"
            "print('bye')\n")
    with trio.fail_after(60):
        client = await start_server(python_config())
        async with connect(client) as ws:
            fid = await run(ws, py(images, code, stdin="first\n"))
            out = ""

            async def expect(wanted):
                nonlocal out
                while wanted not in out:
                    event = await receive(ws)
                    assert event["event"] != "exit", (event, out)
                    if event["event"] == "stdout":
                        out += event["data"]

            await expect("echo:FIRST\n")
            await send(ws, op="stdin", id=fid, data="hello\n")
            await expect("echo:HELLO\n")
            await send(ws, op="stdin", id=fid, data="wor")
            await send(ws, op="stdin", id=fid, data="ld\n")
            await expect("echo:WORLD\n")
            assert "bye" not in out
            await send(ws, op="stdin", id=fid, eof=True)
            rest = await until_exit(ws, fid)
            assert out + text(rest) == "ready\necho:FIRST\necho:HELLO\necho:WORLD\nbye\n"
            assert rest[-1]["status"] == "succeeded"

            # A REST function has had its end-of-file: it takes no more stdin.
            r = await client.post("/fn", json={"image": images.python, "command": "sleep 5"})
            rest_id = r.json()["id"]
            await send(ws, op="stdin", id=rest_id, data="x")
            event = await receive(ws)
            assert event["event"] == "error" and event["id"] == rest_id
            assert "WebSocket" in event["message"]
            await send(ws, op="cancel", id=rest_id)
            assert await receive(ws) == {"event": "status", "id": rest_id, "status": "cancelled"}

        # The creating socket closing is the end-of-file.
        async with connect(client) as ws:
            fid = await run(ws, py(images, "import sys; print(sys.stdin.read().upper())"))
            await send(ws, op="stdin", id=fid, data="sent before close\n")
        record = (await client.get(f"/fn/{fid}?wait=20")).json()
        assert record["status"] == "succeeded"
        assert record["stdout"] == "SENT BEFORE CLOSE\n\n"


async def test_cancel_and_watch_everything(start_server, python_config, images):
    with trio.fail_after(60):
        client = await start_server(python_config())
        async with connect(client) as ws, connect(client) as everything:
            await send(everything, op="watch", id="*")
            fid = await run(ws, {"image": images.python, "command": "echo going; sleep 30"})
            event = await receive(ws)
            while event.get("data") != "going\n":
                event = await receive(ws)
            await send(ws, op="cancel", id=fid)
            rest = await until_exit(ws, fid)
            assert rest[-1]["status"] == "cancelled"
            assert rest[-2] == {"event": "status", "id": fid, "status": "cancelled"}
            statuses = []
            while len(statuses) < 3:
                event = await receive(everything)
                assert event["event"] == "status", event
                if event["id"] == fid:
                    statuses.append(event["status"])
        assert statuses == ["pending", "running", "cancelled"]
        cancelled = (await client.get(f"/fn/{fid}")).json()
        assert cancelled["status"] == "cancelled"
        # Its sleep went with it: a follow-up in its container finds none of its processes.
        look = (await client.post(f"/fn/{fid}?wait=20&strict=true", json={
            "command": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"})).json()
        assert look["locality"] == "hit" and look["container"] == cancelled["container"]
        assert "/proc/" in look["stdout"] and "sleep 30" not in look["stdout"], look["stdout"]


async def test_bad_messages_get_errors_and_the_socket_stays(start_server, python_config,
                                                            images):
    with trio.fail_after(60):
        client = await start_server(python_config())
        async with connect(client) as ws:
            for raw, words in [
                ("{not json", "malformed JSON"),
                ('["run"]', "op is run, watch, stdin or cancel"),
                ('{"op": "fly"}', "op is run"),
                ('{"op": "watch"}', "id: Field required"),
                ('{"op": "stdin", "id": "x", "data": 3}', "data"),
                ('{"op": "run", "spec": {"command": "true"}}', "image"),
                ('{"op": "watch", "id": "nope"}', "no function nope"),
                ('{"op": "cancel", "id": "nope"}', "no function nope"),
                ('{"op": "stdin", "id": "nope", "data": ""}', "no function nope"),
            ]:
                await ws.send_message(raw)
                event = await receive(ws)
                assert event["event"] == "error" and words in event["message"], (raw, event)
            await ws.send_message(b"binary")
            assert "binary" in (await receive(ws))["message"]
            fid = await run(ws, {"image": images.python, "command": ["echo", "still here"]})
            assert text(await until_exit(ws, fid)) == "still here\n"
            await send(ws, op="stdin", id=fid, data="late")
            event = await receive(ws)
            assert event["event"] == "error" and "succeeded" in event["message"]


async def test_one_silent_client_among_twenty(start_server, python_config, images, nursery):
    # 1.6 MB at a pace any reader keeps up with: past the silent client's socket buffers
    # and its watcher bound, so only it falls behind.
    lines, per_write = 200_000, 1000
    code = ("import sys, time; time.sleep(1.5)\n"
            f"for i in range(0, {lines}, {per_write}):\n"
            f"    sys.stdout.write(''.join(f'{{j:07d}}\\n' for j in range(i, i + {per_write})))\n"
            "    sys.stdout.flush(); time.sleep(0.01)\n")
    expected = "".join(f"{j:07d}\n" for j in range(lines))
    bound = 256 << 10
    with trio.fail_after(60):
        client = await start_server(python_config(stream_buffer=bound, output_cap=4 << 20))
        r = await client.post("/fn", json=py(images, code))
        fid = r.json()["id"]
        host, port = client.base_url.host, client.base_url.port
        # The silent client: a small receive buffer, and a library queue of one message.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        silent = await wrap_client_stream(nursery, trio.SocketStream(sock), host, "/fn/ws",
                                          max_message_size=MAX_MESSAGE)
        await send(silent, op="watch", id=fid)
        got: dict[int, str] = {}

        async def reader(n):
            async with connect(client, receive_buffer_size=None) as ws:
                await send(ws, op="watch", id=fid)
                out = []
                while (event := await receive(ws))["event"] != "exit":
                    assert event["event"] != "error", event
                    out.append(event)
                got[n] = text(out)

        async with trio.open_nursery() as readers:
            for n in range(19):
                readers.start_soon(reader, n)
        assert len(got) == 19
        assert all(g == expected for g in got.values())
        watchers = (await client.get("/watchers")).json()
        for stats in watchers:
            assert stats["max_bytes"] == bound
            assert stats["peak_bytes"] <= bound and stats["peak_events"] <= stats["max_events"]
        assert len([s for s in watchers if s["dropped"]]) == 1  # the silent one

        # Once it reads, the silent client learns what it missed, and can watch again.
        seen = []
        while (event := await receive(silent))["event"] != "error":
            seen.append(event)
        assert event == {"event": "error", "id": fid, "missed": True,
                         "message": event["message"]}
        partial = text(seen)
        assert expected.startswith(partial) and len(partial) < len(expected)
        await send(silent, op="watch", id=fid)
        assert text(await until_exit(silent, fid)) == expected
        await silent.aclose()
