"""Bodies built to hurt, over real HTTP and WebSocket against the real server: a refusal
stays small and quick to make, no parse holds the event loop, and functions that wait do
not hold their payloads in memory."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import trio
from command import Server
from trio_websocket import open_websocket_url

MiB = 1 << 20
CAP = 120


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def answers_meanwhile(client, request):
    """Send ``request`` (a coroutine function) and count the /healthz answers the server
    gives while it is in flight: none means the event loop was held all along."""
    answered = 0
    result = None
    async with trio.open_nursery() as nursery:
        async def big():
            nonlocal result
            result = await request()
            nursery.cancel_scope.cancel()
        nursery.start_soon(big)
        await trio.lowlevel.checkpoint()  # let it start sending
        while True:
            r = await client.get("/healthz")
            assert r.status_code == 200
            answered += 1
    return answered, result


async def test_two_million_unknown_keys(start_server, python_config, images):
    """The review's stall: 25 MB of a valid spec plus two million unknown keys."""
    keys = ",".join(f'"k{i}":1' for i in range(2_000_000))
    body = f'{{"image": "{images.python}", "command": "true", {keys}}}'.encode()
    assert len(body) > 24_000_000
    with trio.fail_after(CAP):
        client = await start_server(python_config())
        before = rss()
        answered, r = await answers_meanwhile(
            client, lambda: client.post("/fn", content=body))
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 4096
        error = r.json()
        assert error["error"] == "k0: unknown field"
        assert len(error["detail"]) == 21
        assert error["detail"][-1] == {"field": "spec", "message": "and 1999980 more problems"}
        assert answered >= 3  # the server kept serving while it looked at the body
        assert rss() - before < 300 * MiB  # decoded elsewhere, not here
        assert (await client.get("/fn?status=all")).json() == []


async def test_big_valid_bodies_are_parsed_off_the_loop(start_server, python_config, images):
    blob = os.urandom(20 * MiB)
    spec = {"image": images.python, "command": ["sha256sum", "blob"],
            "resources": [{"path": "blob", "base64": base64.b64encode(blob).decode()}]}
    with trio.fail_after(CAP):
        client = await start_server(python_config(max_file_bytes=32 * MiB))
        answered, r = await answers_meanwhile(
            client, lambda: client.post("/fn?wait=60", content=json.dumps(spec)))
        assert r.status_code == 200, r.text[:300]
        record = r.json()
        assert record["stdout"].split()[0] == hashlib.sha256(blob).hexdigest()
        assert answered >= 1
        # The same through a PUT of a waiting function, and a bad big body: refused, named.
        bad = {**spec, "resources": [{"path": "../blob", "base64": spec["resources"][0][
            "base64"]}]}
        r = await client.post("/fn", content=json.dumps(bad))
        assert r.status_code == 422 and r.json()["error"].startswith("resources.0.path"), \
            r.text[:300]
        r = await client.post("/fn", content=b'{"image": "x", "command": [' + b"1," * MiB)
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]


async def test_a_body_too_big_to_validate_is_refused_and_the_next_one_works(
        start_server, python_config, images):
    """Past its memory the worker gives up on a body; a fresh one takes the next."""
    nested = b'{"image": "%s", "command": [' % images.python.encode() + b"[[[]]]," * 6_000_000
    with trio.fail_after(CAP):
        client = await start_server(python_config())
        r = await client.post("/fn", content=nested + b"[]]}")
        assert r.status_code == 422, r.text[:300]
        assert "too complex" in r.json()["error"] or "command" in r.json()["error"]
        ok = {"image": images.python, "command": ["echo", "after"],
              "resources": [{"path": "pad", "text": "x" * 100_000}]}
        r = await client.post("/fn?wait=30", json=ok)
        assert r.status_code == 200 and r.json()["stdout"] == "after\n", r.text[:300]


async def test_big_messages_over_the_socket(start_server, python_config, images):
    text = "y" * (2 * MiB)
    with trio.fail_after(CAP):
        client = await start_server(python_config())
        url = str(client.base_url).replace("http://", "ws://") + "/fn/ws"
        async with open_websocket_url(url, max_message_size=16 * MiB) as ws:
            spec = {"image": images.python, "command": "wc -c < big; cat | wc -c",
                    "resources": [{"path": "big", "text": text}]}
            await ws.send_message(json.dumps({"op": "run", "spec": spec}))
            created = json.loads(await ws.get_message())
            assert created["event"] == "created", created
            # A lone surrogate in stdin data gets an error event, and the socket stays.
            await ws.send_message(json.dumps({"op": "stdin", "id": created["id"],
                                              "data": "\ud800"}))
            await ws.send_message(json.dumps({"op": "stdin", "id": created["id"],
                                              "data": text, "eof": True}))
            out, errors = "", []
            while True:
                event = json.loads(await ws.get_message())
                if event["event"] == "stdout":
                    out += event["data"]
                elif event["event"] == "error":
                    errors.append(event["message"])
                elif event["event"] == "exit":
                    break
            assert out.split() == [str(len(text)), str(len(text))]
            assert len(errors) == 1 and "surrogate" in errors[0], errors
            bad = {**spec, "timeout": -1}
            await ws.send_message(json.dumps({"op": "run", "spec": bad}))
            refused = json.loads(await ws.get_message())
            while refused["event"] != "error":
                refused = json.loads(await ws.get_message())
            assert refused["message"].startswith("timeout"), refused


async def test_waiting_functions_keep_their_payload_on_disk(tmp_path, images, test_id,
                                                            test_labels):
    """With the pool busy, ten waiting functions of 20 MB each (a real server process, so
    that its memory is its own): at most pending_bytes of them stays in memory, and each
    runs with its content intact once a container is free."""
    import httpx

    config = tmp_path / "ufaas.toml"
    config.write_text(
        f'db = "{tmp_path / "state.db"}"\npending_bytes = {16 * MiB}\n'
        f"max_file_bytes = {24 * MiB}\nmax_total_bytes = {24 * MiB}\n"
        f'labels = {{ "ufaas.test" = "{test_id}" }}\n'
        f'[[pools]]\nimage = "{images.python}"\nmin_idle = 1\nmax = 1\n')
    server = Server(tmp_path, "pending", ["--config", str(config), "--port", "0"])
    try:
        with trio.fail_after(CAP * 2):
            async with httpx.AsyncClient(base_url=await server.ready(), timeout=60) as client:
                blocker = (await client.post("/fn", json={
                    "image": images.python, "command": "sleep 60"})).json()
                while (await client.get(f"/fn/{blocker['id']}")).json()["status"] != \
                        "running":
                    await trio.sleep(0.05)
                before = server.rss()
                digests, ids = [], []
                for _ in range(10):
                    blob = os.urandom(20 * MiB)
                    digests.append(hashlib.sha256(blob).hexdigest())
                    body = json.dumps({
                        "image": images.python, "command": ["sha256sum", "blob"],
                        "resources": [{"path": "blob",
                                       "base64": base64.b64encode(blob).decode()}]})
                    r = await client.post("/fn", content=body)
                    assert r.status_code == 202 and r.json()["status"] == "pending", \
                        r.text[:200]
                    ids.append(r.json()["id"])
                grown = server.rss() - before
                # 200 MB wait; what stays is pending_bytes and the allocator's leftovers.
                assert grown < 64 * MiB, f"waiting payloads held {grown >> 20} MiB"
                await client.delete(f"/fn/{blocker['id']}")
                for fid, digest in zip(ids, digests, strict=True):
                    rec = (await client.get(f"/fn/{fid}?wait=60")).json()
                    assert rec["status"] == "succeeded", rec
                    assert rec["stdout"].split()[0] == digest
    finally:
        server.stop()
