"""A front and its nodes on this machine's engine: real ``ufaas node`` servers on port 0,
the real server, real HTTP and WebSocket clients. What needs more than one engine (faults of
whole machines, images streamed between engines, the Swarm) is in test_lab.py."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import subprocess
import threading
import types

import pytest
import sites
import trio
from conftest import NODE_TOKEN
from trio_websocket import ConnectionClosed, open_websocket, serve_websocket

from pool import Job, Place, Profile
from ufaas import wire
from ufaas.client import Client
from ufaas.config import Config, ConfigError, PoolConfig
from ufaas.function import Function
from ufaas.server import serve


async def nodes_of(client):
    return {n["name"]: n for n in (await client.get("/nodes")).json()}


async def wait_nodes(client, wanted, state="ready", timeout=30):
    """Until every node in ``wanted`` (names) is in ``state``; the /nodes entries."""
    with trio.fail_after(timeout):
        while True:
            nodes = await nodes_of(client)
            if all(nodes.get(name, {}).get("state") == state for name in wanted):
                return nodes
            await trio.sleep(0.1)


async def wait_warm(client, node, count=1, timeout=60):
    with trio.fail_after(timeout):
        while sum(p["warm"] for p in (await client.get("/pools")).json()
                  if p["node"] == node) < count:
            await trio.sleep(0.1)


async def wait_status(client, fid, wanted, timeout=30):
    with trio.fail_after(timeout):
        while (rec := (await client.get(f"/fn/{fid}")).json())["status"] not in wanted:
            await trio.sleep(0.05)
    return rec


def python(code: str, **spec) -> dict:
    return {"image": "ufaas-test/python", "command": ["python3", "-c", code], **spec}


# A front's handshake, for the tests that play the front on a node's socket themselves.
FRONT_HEADERS = [(b"authorization", f"Bearer {NODE_TOKEN}".encode()),
                 (wire.PROTOCOL_HEADER.encode(), wire.speaks().encode()),
                 (wire.FRONT_HEADER.encode(), b"h0me i0")]


class Played:
    """A node's socket as those tests read it: message by message, a batch ("many")
    taken apart as a front takes it."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self._read: list = []
        self.ops: list[str] = []  # of every message read

    async def until(self, op: str, lid: str | None = None):
        """The next message of ``op`` (about ``lid``, when given), or a failure."""
        while True:
            while not self._read:
                self._read = wire.messages(await self.ws.get_message())
            header, parts = self._read.pop(0)
            self.ops.append(header["op"])
            if header["op"] in (op, "failed") and (lid is None or header.get("lid") == lid):
                return header, parts


async def test_a_function_runs_on_a_remote_node_as_it_would_here(start_node, front_config,
                                                                  start_server, images):
    node = await start_node("node-a")
    client = await start_server(front_config([node.url]))
    with trio.fail_after(90):
        nodes = await wait_nodes(client, [node.name])
        assert nodes[node.name]["url"] == node.url and not nodes[node.name]["local"]
        assert nodes[node.name]["capacity"]["max_containers"] == 32
        await wait_warm(client, node.name)
        ok = (await client.post("/fn?wait=30", json=python(
            "import sys; print(6 * 7); print('to err', file=sys.stderr)"))).json()
        assert (ok["status"], ok["stdout"], ok["stderr"], ok["node"]) == (
            "succeeded", "42\n", "to err\n", node.name), ok
        failed = (await client.post("/fn?wait=30", json=python("raise SystemExit(3)"))).json()
        assert (failed["status"], failed["exit_code"], failed["node"]) == ("failed", 3, node.name)
        slow = (await client.post("/fn?wait=30", json=python("import time; time.sleep(30)",
                                                            timeout=1))).json()
        assert slow["status"] == "timeout", slow
        big = (await client.post("/fn?wait=30", json=python(
            "print('x' * 3000000)"))).json()
        assert big["truncated"] and len(big["stdout"]) == 1 << 20  # output_cap, as here
        # A follow-up finds its predecessor's container, on its node, and its files.
        first = (await client.post("/fn?wait=30", json={
            "image": images.python, "command": "echo kept > note.txt"})).json()
        after = (await client.post(f"/fn/{first['id']}?wait=30&strict=true",
                                   json={"command": ["cat", "note.txt"]})).json()
        assert (after["locality"], after["stdout"], after["container"], after["node"]) == (
            "hit", "kept\n", first["container"], node.name), after
        # Output files are collected on the node and kept by the front.
        made = (await client.post("/fn?wait=30", json={
            "image": images.python, "command": "printf 'made there' > out.txt; : > none.txt",
            "outputs": ["out.txt", "none.txt"]})).json()
        assert [(f["path"], f["size"]) for f in made["files"]] == [
            ("none.txt", 0), ("out.txt", 10)], made
        got = await client.get(f"/fn/{made['id']}/files/out.txt")
        assert got.content == b"made there" and made["node"] == node.name
        pools = [p for p in (await client.get("/pools")).json() if p["node"] == node.name]
        assert [p["image"] for p in pools] == [images.python] and pools[0]["mode"] == "agent"
        assert (await client.get("/healthz")).status_code == 200


async def test_live_output_stdin_and_cancel_through_a_node(start_node, front_config,
                                                           start_server, images):
    node = await start_node("node-a")
    client = await start_server(front_config([node.url]))
    url = str(client.base_url)
    with trio.fail_after(90):
        await wait_nodes(client, [node.name])
        out: list[str] = []

        async def chunks():
            for i in range(3):
                yield f"line {i}\n"
                await trio.sleep(0.05)

        async with Client(url) as ufaas:
            end = await ufaas.run(python("import sys\nfor l in sys.stdin: print(l.upper(), "
                                         "end='', flush=True)"), stdin=chunks(),
                                  stdout=out.append)
            assert end["status"] == "succeeded" and "".join(out) == "LINE 0\nLINE 1\nLINE 2\n"
            # Megabytes of stdin: more than the window a node takes at once.
            data = "y" * (3 << 20)
            end = await ufaas.run(python("import sys; print(len(sys.stdin.read()))"),
                                  stdin=data, stdout=out.append)
            assert end["status"] == "succeeded" and out[-1] == f"{len(data)}\n"
        running = (await client.post("/fn", json=python(
            "import time; print('started', flush=True); time.sleep(60)"))).json()
        with trio.fail_after(30):
            while (await client.get(f"/fn/{running['id']}")).json()["stdout"] != "started\n":
                await trio.sleep(0.05)
        gone = (await client.delete(f"/fn/{running['id']}")).json()
        assert gone["status"] == "cancelled", gone
        again = (await client.post("/fn?wait=30", json=python("print('after')"))).json()
        assert again["stdout"] == "after\n" and again["container"] == gone["container"]


async def two_warm_nodes(start_node, front_config, start_server, images):
    """Nodes a and b, and a front using both, with a warm python container on
    each (a pool of min_idle 1, max 1 per node): the nodes and the front's client."""
    a, b = await start_node("node-a"), await start_node("node-b")
    client = await start_server(front_config([a.url, b.url], pools=[PoolConfig(
        image=images.python, min_idle=1, max=1)]))
    with trio.fail_after(90):
        await wait_nodes(client, [a.name, b.name])
        await wait_warm(client, a.name)
        await wait_warm(client, b.name)
    return a, b, client


async def test_the_front_sees_a_nodes_pools_as_they_are_between_beats(
        start_node, front_config, start_server, images):
    """Leases and releases tell the front a pool's counters alone: with beats too far apart
    to help, what ``GET /pools`` shows of the node's pool after them is what the node has."""
    slow = {"heartbeat": 60, "node_timeout": 120}
    node = await start_node("node-a", cluster=slow)
    client = await start_server(front_config([node.url], cluster=slow))
    with trio.fail_after(90):
        await wait_nodes(client, [node.name])
        running = (await client.post("/fn", json=python("import time; time.sleep(2)"))).json()
        await wait_status(client, running["id"], ("running",))
        for _ in range(3):  # on the other container, while the first is busy
            done = (await client.post("/fn?wait=30", json=python("print(1)"))).json()
            assert done["status"] == "succeeded", done
        await wait_status(client, running["id"], ("succeeded",))
        [pool] = list(node.node._fronts.values())[0].pools
        while True:
            stats = pool.statistics()
            [shown] = [p for p in (await client.get("/pools")).json() if p["node"] == node.name]
            if (shown["warm"], shown["busy"], shown["total"]) == (
                    stats.idle, stats.busy, stats.total) and not stats.busy:
                break
            await trio.sleep(0.05)
        assert stats.total == 2 and stats.started == 2


async def test_a_run_whose_chosen_container_went_waits_for_another(start_node, front_config,
                                                                  start_server, images):
    """The front chooses an idle container from the node's view; when that container was
    taken meanwhile (here behind the front's back, with beats too far apart to tell it),
    the node refuses the run, which never started, and the function waits for a
    container as any other: it runs once, not ending in error. Past pending_bytes (here 0)
    it waits as others do, with its spec on disk, not in memory."""
    slow = {"heartbeat": 60, "node_timeout": 120}
    node = await start_node("node-a", cluster=slow)
    client = await start_server(front_config([node.url], cluster=slow, pending_bytes=0,
                                             pools=[PoolConfig(image=images.python,
                                                               min_idle=1, max=1)]))
    with trio.fail_after(60):
        await wait_nodes(client, [node.name])
        # Its release tells the front the container is idle (no beat will say otherwise).
        first = (await client.post("/fn?wait=30", json=python("print('first')"))).json()
        assert first["status"] == "succeeded", first
        await wait_warm(client, node.name)  # the front's view shows it idle again
        [pool] = list(node.node._fronts.values())[0].pools
        while not pool.statistics().idle:  # the release reaches the node within LATER
            await trio.sleep(0.01)
        taken = pool.claim()
        assert taken is not None
        answers = []

        async def post():
            answers.append((await client.post("/fn?wait=60", json=python(
                "print('ran')"))).json())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            while pool.statistics().waiting == 0:  # it asked for a container
                await trio.sleep(0.02)
            [waiting] = (await client.get("/fn?status=pending")).json()  # never started
            assert (waiting["container"], waiting["started_at"]) == (None, None), waiting
            [function] = [f for f in gc.get_objects()
                          if isinstance(f, Function) and f.id == waiting["id"]]
            assert (function.spec, function.pinned) == (None, False)
            taken.release()
        [done] = answers
        assert (done["status"], done["stdout"]) == ("succeeded", "ran\n"), done
        assert done["container"] == taken.place.container[:12] and done["node"] == node.name


async def test_work_spreads_over_the_nodes(start_node, front_config, start_server, images):
    a, b, client = await two_warm_nodes(start_node, front_config, start_server, images)
    with trio.fail_after(120):
        ids = [(await client.post("/fn", json=python("import time; time.sleep(1)"))).json()["id"]
               for _ in range(4)]
        done = [(await client.get(f"/fn/{fid}?wait=60")).json() for fid in ids]
        assert [r["status"] for r in done] == ["succeeded"] * 4, done
        # Both idle containers were used at once; the two that waited went to either.
        assert {done[0]["node"], done[1]["node"]} == {a.name, b.name}, done


async def test_a_lost_node_ends_its_runs_and_its_queue_moves(start_node, front_config,
                                                              start_server, images):
    a, b, client = await two_warm_nodes(start_node, front_config, start_server, images)
    with trio.fail_after(150):
        long = [(await client.post("/fn", json=python("import time; time.sleep(120)"))).json()
                for _ in range(2)]
        running = [await wait_status(client, f["id"], ("running",)) for f in long]
        assert {r["node"] for r in running} == {a.name, b.name}
        queued = [(await client.post("/fn", json=python("print('moved')"))).json()
                  for _ in range(2)]
        on_a = next(r for r in running if r["node"] == a.name)
        a.stop()  # a crash: its connection drops, its containers go
        lost = (await client.get(f"/fn/{on_a['id']}?wait=30")).json()
        assert lost["status"] == "error" and f"node {a.name} lost" in lost["error"], lost
        await wait_nodes(client, [a.name], state="lost")
        on_b = next(r for r in running if r["node"] == b.name)
        await client.delete(f"/fn/{on_b['id']}")
        moved = [(await client.get(f"/fn/{q['id']}?wait=30")).json() for q in queued]
        assert [(m["status"], m["stdout"], m["node"]) for m in moved] == [
            ("succeeded", "moved\n", b.name)] * 2, moved
        # The node comes back where it was: the front finds it, and uses it again.
        await start_node("node-a", port=a.port)
        await wait_nodes(client, [a.name])
        await wait_warm(client, a.name)
        blocker = (await client.post("/fn", json=python("import time; time.sleep(2)"))).json()
        second = (await client.post("/fn?wait=30", json=python("print(1)"))).json()
        first = (await client.get(f"/fn/{blocker['id']}?wait=30")).json()
        assert {first["node"], second["node"]} == {a.name, b.name}


async def test_a_wrong_token_is_refused_on_both_sides(start_node, front_config, start_server,
                                                      caplog):
    caplog.set_level(logging.INFO)
    node = await start_node("node-a", token="the-right-one")
    client = await start_server(front_config([node.url], token="a-wrong-one"))
    with trio.fail_after(30):
        nodes = await wait_nodes(client, [f"127.0.0.1:{node.port}"], state="refused")
    error = nodes[f"127.0.0.1:{node.port}"]["error"]
    assert "refused this front (403): wrong or missing cluster token" in error
    assert any("refused a front at 127.0.0.1" in r.getMessage() and "token" in r.getMessage()
               for r in caplog.records if r.name == "ufaas.node")
    assert any("refused this front (403)" in r.getMessage()
               for r in caplog.records if r.name == "ufaas.cluster")
    assert (await client.get("/healthz")).status_code == 503
    pending = (await client.post("/fn?wait=1", json=python("print(1)"))).json()
    assert pending["status"] == "pending"  # it waits for a node; nothing ran it


async def test_a_version_mismatch_is_refused_on_both_sides(start_node, front_config,
                                                           start_server, caplog):
    caplog.set_level(logging.INFO)
    newer = f"{wire.PROTOCOL + 1} {wire.SCHEMA} 9.9.9"
    node = await start_node("node-a", speaks_as=newer)
    client = await start_server(front_config([node.url]))
    with trio.fail_after(30):
        nodes = await wait_nodes(client, [f"127.0.0.1:{node.port}"], state="refused")
    error = nodes[f"127.0.0.1:{node.port}"]["error"]
    assert f"the node speaks protocol {wire.PROTOCOL + 1}" in error, error
    assert f"the front protocol {wire.PROTOCOL} (schema {wire.SCHEMA}" in error, error
    said = [r.getMessage() for r in caplog.records if r.name == "ufaas.node"]
    assert any("version mismatch" in m and "ufaas 9.9.9" in m for m in said), said


async def test_a_restarted_front_has_its_old_containers_removed(start_node, front_config,
                                                                 test_id, test_labels, nursery,
                                                                 docker_client):
    node = await start_node("node-a")
    config = front_config([node.url])

    async def front(instance):
        stop = trio.Event()
        url = await nursery.start(functools.partial(
            serve, config, shutdown_trigger=stop.wait, instance=instance, labels=test_labels))
        return url, stop

    def containers(instance):
        # (listed, then inspected one by one: the ones being removed meanwhile are gone)
        return docker_client.containers.list(
            filters={"label": [f"ufaas.instance={instance}-{node.name}",
                               f"ufaas.node={node.name}"]},
            ignore_removed=True)

    with trio.fail_after(120):
        url, stop = await front(f"{test_id}-one")
        async with Client(url) as ufaas:
            first = await ufaas.create(python("print('before')"), wait=30)
            while not containers(f"{test_id}-one"):
                await trio.sleep(0.1)
        stop.set()  # the front goes; the node keeps its warm containers for front_grace
        url, stop = await front(f"{test_id}-two")
        async with Client(url) as ufaas:
            assert (await ufaas.get(first["id"]))["stdout"] == "before\n"
            while containers(f"{test_id}-one") or not containers(f"{test_id}-two"):
                await trio.sleep(0.1)
            after = await ufaas.create(python("print('after')"), wait=30)
            assert after["node"] == node.name and after["container"] != first["container"]
        stop.set()


async def test_a_peer_that_breaks_the_protocol_is_cut_off(start_node, front_config,
                                                          start_server, caplog):
    """Every claim from a front is checked before anything is held for it: a message past
    ``max_message``, stdin past its window, a message of no kind."""
    caplog.set_level(logging.INFO)
    node = await start_node("node-a", cluster={"max_message": 1 << 20})

    async def session(send: bytes) -> str:
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            hello, _ = wire.unpack(await ws.get_message())
            assert hello["op"] == "hello" and hello["node"] == node.name
            with trio.fail_after(10):
                try:
                    await ws.send_message(send)
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    return str(exc.reason)

    with trio.fail_after(60):
        closed = await session(b"\0" * (2 << 20))
        assert "1009" in closed or "MESSAGE_TOO_BIG" in closed, closed
        profile, near = Profile(), Place("nope", "nope")
        lease = wire.message("lease", {"profile": profile, "near": near}, lid="l1",
                             image="ufaas-test/python", configured=False, sizes={"max": 1},
                             strict=False, timeout=5)
        await session(lease)  # a lease the session ends with: held nowhere after
        await session(wire.message("exploit"))
        await session(wire.message("lease", {"profile": "not one"}, lid="l2",
                                   image="x", sizes={}, timeout=1))
        # Numbers JSON allows that no front makes: NaN would pass "timeout < 0", and lift
        # an output cap (min(nan, cap) is nan); a field of another type.
        await session(wire.message("lease", {"profile": profile, "near": None}, lid="l3",
                                   image="ufaas-test/python", configured=False,
                                   sizes={"max": 1}, strict=False, timeout=math.nan))
        for bad in ({"output_cap": math.nan}, {"timeout": "soon"}):
            await session(wire.message("run", {"job": Job(["true"], **bad)}, lid="l4",
                                       live=False, pool=0, container="c" * 12,
                                       workdir="0" * 32))
    said = [r.getMessage() for r in caplog.records if r.name == "ufaas.node"]
    assert any("broke the protocol: a lease without a timeout" in m for m in said), said
    assert any("broke the protocol: a job whose output_cap cannot be" in m for m in said)
    assert any("broke the protocol: a job whose timeout cannot be" in m for m in said)
    assert any("broke the protocol: an unknown or malformed 'exploit'" in m for m in said)
    assert any("broke the protocol: a pool without an image" in m for m in said), said


async def test_stdin_right_behind_a_run_is_not_lost(start_node, images):
    """What a front sends right after a run (its first stdin, the end of it) may reach the
    node before the run has started there: it is kept for it, every time."""
    node = await start_node("node-a")

    with trio.fail_after(90):
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            peer = Played(ws)
            for i in range(20):
                lid = f"l{i}"
                await ws.send_message(wire.message(
                    "lease", {"profile": Profile(), "near": None}, lid=lid,
                    image=images.python, configured=False, sizes={"max": 1}, strict=False,
                    timeout=30))
                leased, _ = await peer.until("leased")
                assert leased["op"] == "leased", leased
                for data in (wire.message("run", {"job": Job(["cat"])}, lid=lid, live=True),
                             wire.pack({"op": "stdin", "lid": lid}, [f"in {i}".encode()]),
                             wire.pack({"op": "stdin", "lid": lid, "eof": True})):
                    await ws.send_message(data)
                out, parts = await peer.until("out")
                assert parts == [f"in {i}".encode()], (out, parts)
                result, parts = await peer.until("result")
                assert wire.fields_of(result, parts)["result"].outcome == "exited"
                await ws.send_message(wire.message("release", lid=lid, discard=False))


async def test_a_claim_takes_an_idle_container_at_once_or_fails(start_node, images):
    """A front that sees an idle container in a pool's view names it in the run it sends,
    without waiting: the node takes that container before reading on, and a run naming one
    that is not idle (taken, or gone) or an unknown pool fails. A cancel right behind a
    run holds."""
    node = await start_node("node-a")

    def run(lid, number, cid, argv):
        return wire.message("run", {"job": Job(argv)}, lid=lid, live=False, pool=number,
                            container=cid, workdir=lid.ljust(32, "0"))

    with trio.fail_after(90):
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            peer = Played(ws)
            await ws.send_message(wire.message(
                "pool", {"profile": Profile(), "near": None}, rid="r1", image=images.python,
                configured=True, sizes={"min_idle": 1, "max": 1}))
            header, parts = await peer.until("pool")
            number = wire.fields_of(header, parts)["pool"]["number"]
            while True:  # until a beat shows the pool's container idle
                header, parts = await peer.until("beat")
                [view] = wire.fields_of(header, parts)["pools"]
                if view["idle"]:
                    break
            [cid] = view["idle"]
            await ws.send_message(run("a1", number, cid, ["echo", "hi"]))
            await ws.send_message(run("a2", number, cid, ["echo", "no"]))  # taken by a1
            failed, _ = await peer.until("failed", "a2")
            assert failed["op"] == "failed" and "no longer idle" in failed["error"], failed
            result, parts = await peer.until("result", "a1")
            fields = wire.fields_of(result, parts)  # a short run's output comes with its end
            assert fields["result"].outcome == "exited" and fields["out"] == [[1, b"hi\n"]]
            await ws.send_message(wire.message("release", lid="a1", discard=False,
                                                 counted=True))
            await ws.send_message(run("a3", "no such pool", cid, ["echo", "no"]))
            assert (await peer.until("failed", "a3"))[0]["op"] == "failed"
            await ws.send_message(run("a4", number, cid, ["sh", "-c", "echo again; sleep 1"]))
            out, parts = await peer.until("out", "a4")  # idle again; what it says goes soon
            assert wire.fields_of(out, parts)["out"] == [[1, b"again\n"]], (out, parts)
            result, parts = await peer.until("result", "a4")
            assert wire.fields_of(result, parts)["out"] == []
            await ws.send_message(wire.message("release", lid="a4", discard=False,
                                                 counted=True))
            # A cancel read right behind its run, before the run began there, still holds.
            await ws.send_message(wire.pack({"op": "many"}, [
                run("a5", number, cid, ["sleep", "30"]), wire.message("cancel", lid="a5")]))
            result, parts = await peer.until("result", "a5")
            assert wire.fields_of(result, parts)["result"].outcome == "cancelled"
            await ws.send_message(wire.message("release", lid="a5", discard=False,
                                               counted=True))
            await ws.send_message(run("a6", number, cid, ["true"]))  # idle again
            await peer.until("result", "a6")
            # Those releases left the pool as the front was last told, and as it counted
            # them itself (each container idle again): no view of the pool said so.
            assert "view" not in peer.ops, peer.ops
            # A release the front did not count gets the pool's view, even unchanged.
            await ws.send_message(wire.message("release", lid="a6", discard=False))
            view, _ = await peer.until("view")
            assert view["pool"] == number and view["idle"] == [cid], view
            # One that leaves the pool otherwise does too: here the container is gone.
            await ws.send_message(run("a7", number, cid, ["true"]))
            await peer.until("result", "a7")
            await ws.send_message(wire.message("release", lid="a7", discard=True))
            header, parts = await peer.until("view")  # in full: its containers changed
            view = wire.fields_of(header, parts)["pool"]
            assert view["number"] == number and cid not in view["containers"], view


async def test_an_image_stream_the_front_gives_up_on_ends_on_the_node(start_node, images):
    """A front that gives up on an image it streams, either way, says so (image_cancel),
    even right behind the request: the node stops, sends nothing more of it, and holds
    nothing for it (its id may be used again)."""
    node = await start_node("node-a")
    with trio.fail_after(60):
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            await ws.get_message()  # hello
            await ws.send_message(wire.pack({"op": "many"}, [
                wire.message("image_export", rid="e1", image=images.busybox),
                wire.message("image_cancel", rid="e1")]))
            heard = []
            with trio.move_on_after(1):
                while True:
                    heard += [h for h, _ in wire.messages(await ws.get_message())
                              if h.get("rid") == "e1"]
            assert heard == [], heard  # not one chunk of it
            for _ in range(2):  # the second import of i1 is refused if the first holds on
                await ws.send_message(wire.pack({"op": "many"}, [
                    wire.message("image_import", rid="i1", image="ufaas-test/never"),
                    wire.pack({"op": "chunk", "rid": "i1"}, [b"not all of a tar"]),
                    wire.message("image_cancel", rid="i1")]))
                await ws.send_message(wire.message("image_has", rid="h1",
                                                   image=images.busybox))
                while not any(h["op"] == "image" and h.get("rid") == "h1"
                              for h, _ in wire.messages(await ws.get_message())):
                    pass
                await trio.sleep(0.2)


class FakeNode:
    """A node as a front sees one, played by the test: it greets, beats every 0.2 s with
    no pools, records what it is sent but beats (op and id), and answers each message as
    ``answer(ws, header)`` says. ``reading`` False: it reads nothing after the hello.
    A message's id is its rid or its lid."""

    def __init__(self, answer=None, *, reading=True) -> None:
        self.heard: list[tuple[str, str | None]] = []
        self.answer = answer
        self.reading = reading

    async def handle(self, request) -> None:
        ws = await request.accept()
        await ws.send_message(wire.message("hello", node="fake", speaks=wire.speaks(),
                                           max_containers=4))
        async with trio.open_nursery() as beats:
            async def beat():
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.send_message(wire.message("beat", {"pools": []},
                                                           engine=True))
                        await trio.sleep(0.2)
                beats.cancel_scope.cancel()  # the front is gone
            beats.start_soon(beat)
            with contextlib.suppress(ConnectionClosed):
                while self.reading:
                    for header, _ in wire.messages(await ws.get_message()):
                        if header["op"] != "beat":
                            self.heard.append((header["op"],
                                               header.get("rid") or header.get("lid")))
                            if self.answer is not None:
                                await self.answer(ws, header)
                await trio.sleep_forever()
            beats.cancel_scope.cancel()

    async def start(self, nursery, front_config, **settings):
        """Serve it, and a front's Cluster connected to it: the front's RemoteNode."""
        from ufaas.cluster import Cluster

        server = await nursery.start(functools.partial(
            serve_websocket, self.handle, "127.0.0.1", 0, None, max_message_size=1 << 26))
        config = front_config([f"ws://127.0.0.1:{server.port}"], pools=[], **settings)
        cluster = await nursery.start(Cluster(config, None, home="h0me", instance="i0").serve)
        with trio.fail_after(30):
            while not any(n.ready for n in cluster.remote_nodes()):
                await trio.sleep(0.05)
        return next(cluster.remote_nodes())

    async def told(self, op, rid):
        with trio.fail_after(10):
            while (op, rid) not in self.heard:
                await trio.sleep(0.02)

    def about(self, rid):
        return [op for op, r in self.heard if r == rid]


async def test_a_front_that_gives_up_on_an_image_stream_tells_the_node(front_config,
                                                                      nursery):
    """The front's side of image_cancel: an import it stops waiting for, and an export it
    stops reading, each end with an image_cancel of that stream, so that the node stops
    loading or saving it (the node's side is the test above)."""
    async def answer(ws, header):
        if header["op"] == "image_export":  # a first chunk, then nothing
            await ws.send_message(wire.pack({"op": "chunk", "rid": header["rid"]},
                                            [b"x" * 1000]))

    fake = FakeNode(answer)
    node = await fake.start(nursery, front_config)
    send, receive = trio.open_memory_channel[bytes](1)
    await send.send(b"part of a tar")  # and no more: the import waits for the rest
    with trio.move_on_after(0.5) as gave_up:
        await node.import_image("ufaas-test/never", receive)
    assert gave_up.cancelled_caught
    (rid,) = [rid for op, rid in fake.heard if op == "image_import"]
    await fake.told("image_cancel", rid)
    assert fake.about(rid) == ["image_import", "chunk", "image_cancel"]

    chunks = node.export_image("ufaas-test/python")
    assert await chunks.__anext__() == b"x" * 1000
    await chunks.aclose()  # read one chunk, and stopped
    (rid,) = [rid for op, rid in fake.heard if op == "image_export"]
    await fake.told("image_cancel", rid)
    # The chunk read is acknowledged before the stream is given up on.
    assert fake.about(rid) == ["image_export", "ack", "image_cancel"]


async def test_an_import_the_node_fails_ends_at_once(front_config, nursery):
    """A node that cannot load an image says so, and acknowledges nothing more: the front
    stops sending it and fails the import then, not at image_timeout."""
    from pool import PoolError

    async def answer(ws, header):
        if header["op"] == "image_import":
            await ws.send_message(wire.message("failed", rid=header["rid"],
                                               error="not a tar, says the test"))

    fake = FakeNode(answer)
    node = await fake.start(nursery, front_config)
    send, receive = trio.open_memory_channel[bytes](math.inf)
    for _ in range(32):  # 32 MiB: four times the window the node never acknowledges
        send.send_nowait(b"x" * (1 << 20))
    send.close()
    with trio.fail_after(10), pytest.raises(PoolError, match="not a tar, says the test"):
        await node.import_image("ufaas-test/never", receive)
    (rid,) = [rid for op, rid in fake.heard if op == "image_import"]
    assert "image_end" not in fake.about(rid)
    assert fake.about(rid).count("chunk") <= 9  # no more than the window held


async def test_an_unlisted_node_ends_what_waits_on_it_at_once(front_config, nursery):
    """A node the front stops using (unlisted from the cluster's nodes, or the front
    stopping) is lost then: what waits for its answer ends at once, naming it."""
    from ufaas.cluster import NodeLost

    fake = FakeNode()  # answers nothing
    node = await fake.start(nursery, front_config)
    failed = []

    async def ask():
        with pytest.raises(NodeLost) as caught:
            await node.image_id("ufaas-test/python")
        failed.append(str(caught.value))

    with trio.fail_after(5):
        async with trio.open_nursery() as asking:
            asking.start_soon(ask)
            while not fake.heard:
                await trio.sleep(0.02)
            node.close()
    assert "fake lost: disconnected" in failed[0], failed
    assert node.state == "lost"


async def test_a_lease_the_node_answers_wrongly_is_released_and_fails(front_config,
                                                                    nursery):
    """A node that grants a lease in an answer that does not hold (no pool view, no
    container): the front fails that lease as a PoolError (its function may go
    elsewhere) and tells the node to let the container go."""
    from pool import PoolError

    async def answer(ws, header):
        if header["op"] == "lease":
            await ws.send_message(wire.message("leased", lid=header["lid"]))

    fake = FakeNode(answer)
    node = await fake.start(nursery, front_config)
    pool = types.SimpleNamespace(image="ufaas-test/python", profile=Profile(),
                                 configured=False, sizes={"min_idle": 0, "max": 1})
    with trio.fail_after(10), pytest.raises(PoolError, match="broke the protocol"):
        await node.lease(pool, None, False, trio.current_time() + 5)
    (lid,) = [lid for op, lid in fake.heard if op == "lease"]
    await fake.told("release", lid)


async def test_a_node_that_takes_no_message_is_lost_and_the_front_serves_on(
        front_config, nursery, monkeypatch):
    """A node that beats but reads nothing: the front's send to it ends at its deadline
    (node_timeout, and a second a MiB on a slow link), the node is lost saying why, and
    the front goes on (it once fell over here)."""
    monkeypatch.setattr(wire, "SLOWEST_LINK", 1 << 40)  # the deadline: node_timeout
    fake = FakeNode(reading=False)
    # A short connect_timeout: the closing handshake it waits for is never answered.
    node = await fake.start(nursery, front_config, cluster={"connect_timeout": 2})
    for _ in range(4):  # more than the sockets' buffers hold
        node.send(wire.pack({"op": "beat"}, [b"x" * (16 << 20)]))
    with trio.fail_after(20):
        while node.state == "ready":
            await trio.sleep(0.05)
    assert "it took no message of" in str(node.error), node.error
    # And it connects again, as to any node that was lost, once leaving the connection
    # is given up on (the reader of its messages stuck): twice connect_timeout.
    with trio.fail_after(15):
        while not node.ready:
            await trio.sleep(0.05)


def _tasks_under(task, part: str) -> list:
    """The tasks below ``task`` whose name holds ``part``."""
    found = []
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found += [child] if part in child.name else []
            found += _tasks_under(child, part)
    return found


async def test_a_front_that_stops_reading_leaves_nothing_behind_on_the_node(start_node,
                                                                           images):
    """A front that goes on beating but reads nothing while its function floods stdout:
    the node's send to it ends at its deadline, the session ends, and so does all of
    the connection on the node, its reader of the front's messages too."""
    node = await start_node("node-a")
    serving = next(t for t in _tasks_under(trio.lowlevel.current_root_task(), "_serve_node"))
    with trio.fail_after(90):
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            peer = Played(ws)
            await peer.until("beat")
            await ws.send_message(wire.message(
                "lease", {"profile": Profile(), "near": None}, lid="l1", strict=False,
                timeout=60.0, image=images.python, configured=False,
                sizes={"min_idle": 0, "max": 1}))
            await peer.until("leased", "l1")
            await ws.send_message(wire.message("run", {"job": Job(
                ["python3", "-c", "import os\nwhile True: os.write(1, b'x' * 65536)"],
                timeout=60.0, output_cap=64 << 20)}, lid="l1", live=False))  # past buffers
            assert _tasks_under(serving, "_reader_task")  # the connection, on the node
            while _tasks_under(serving, "_reader_task"):  # until all of it ends
                with contextlib.suppress(ConnectionClosed):  # once the node has closed it
                    await ws.send_message(wire.message("beat"))  # reading nothing
                await trio.sleep(0.5)
            assert all(f.sessions == 0 for f in node.node._fronts.values())
            # This end's reader is stuck as the node's was, on what it read and nobody
            # took: take it, as the node does, so that leaving does not wait on it.
            await ws.aclose()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.get_message()


async def test_much_output_through_a_node_comes_whole_and_in_order(start_node, front_config,
                                                                  start_server):
    """A node holds a run's output to send it with the result, up to OUTPUT_HOLD_BYTES;
    past that the run's output goes on as it comes. Either way the front gets it all, in
    order, each stream apart."""
    from ufaas.node import OUTPUT_HOLD_BYTES

    node = await start_node("node-a")
    client = await start_server(front_config([node.url]))
    # Written at once, faster than the node sends: past the hold before it goes.
    lines = OUTPUT_HOLD_BYTES // 3  # ~6 bytes a line: twice the hold, a bit more
    code = ("import os\n"
            f"text = ''.join(f'{{i}}\\n' for i in range({lines})).encode()\n"
            "for k in range(0, len(text), 100000):\n"
            "    os.write(1, text[k:k + 100000])\n"
            "    os.write(2, b'err %d\\n' % k)\n")
    with trio.fail_after(90):
        await wait_nodes(client, [node.name])
        await wait_warm(client, node.name)
        done = (await client.post("/fn?wait=30", json=python(code))).json()
        assert done["status"] == "succeeded" and not done["truncated"], done["status"]
        text = "".join(f"{i}\n" for i in range(lines))
        assert done["stdout"] == text
        assert done["stderr"] == "".join(f"err {k}\n" for k in range(0, len(text), 100000))
        short = (await client.post("/fn?wait=30", json=python("print('short')"))).json()
        assert short["stdout"] == "short\n", short


def _view_of_image(image) -> bytes:
    from pool import PoolStatistics

    stats = PoolStatistics(image="i", name="n", mode="agent", idle=0, busy=0, starting=0,
                           total=0, waiting=0, started=0, failed_starts=0, last_error=None)
    return wire.message("view", {"pool": {
        "name": "n", "reference": "r", "image": image, "profile": Profile(), "min_idle": 0,
        "max": 1, "configured": False, "statistics": stats, "containers": [], "idle": [],
        "number": 1}})


@pytest.mark.parametrize("said", [
    wire.message("beat", {"pools": [{"statistics": 1}]}, engine=True),  # pools that are not
    wire.message("out", lid=[1], fd=1),  # an id that is not one
    _view_of_image(["not", "a", "name"]),
], ids=["beat", "id", "view"])
async def test_a_node_that_breaks_the_protocol_is_lost(front_config, start_server, nursery,
                                                       said):
    """The front checks what a node claims as a node checks the front: here a node that
    greets properly, then sends what no node would; the front goes on serving."""
    async def fake_node(request):
        ws = await request.accept()
        await ws.send_message(wire.message("hello", node="liar", speaks=wire.speaks(),
                                           max_containers=4))
        await ws.send_message(said)
        await trio.sleep(30)

    server = await nursery.start(serve_websocket, fake_node, "127.0.0.1", 0, None)
    client = await start_server(front_config([f"ws://127.0.0.1:{server.port}"]))
    with trio.fail_after(30):
        while "broke the protocol" not in str((await nodes_of(client)).get("liar", {})
                                              .get("error")):
            await trio.sleep(0.1)
    assert (await nodes_of(client))["liar"]["state"] != "ready"


async def test_the_fronts_own_engine_fails_an_image_stream_as_a_node_does(images):
    """The image streams between nodes expect a PoolError of any node that fails one: the
    front's own engine (LocalNode) gives that too, not the engine's errors."""
    from pool import Engine, PoolError, Pools
    from ufaas.cluster import LocalNode

    engine = Engine()
    try:
        local = LocalNode(Pools(engine, home="stream-test"))
        send, receive = trio.open_memory_channel[bytes](1)
        async with send:
            await send.send(b"not a tar")
        with trio.fail_after(60), pytest.raises(PoolError, match="cannot load"):
            await local.import_image("ufaas-test/never", receive)
        with trio.fail_after(60), pytest.raises(PoolError, match="cannot export"):
            async for _ in local.export_image("ufaas-test/never-was"):
                pass
        engine.call_timeout = 1e-6  # no answer comes that fast
        with pytest.raises(PoolError, match="did not answer"):
            await local.image_id(images.busybox)
    finally:
        with trio.CancelScope(shield=True):
            await engine.aclose()


async def test_an_engine_too_slow_for_a_lease_fails_that_lease_alone(start_node, images):
    """A node whose engine does not answer in time for a lease (an inspect, a pull) fails
    that lease, saying so, and goes on serving the front."""
    node = await start_node("node-a")
    with trio.fail_after(60):
        async with open_websocket("127.0.0.1", node.port, "/", use_ssl=False,
                                  extra_headers=FRONT_HEADERS, max_message_size=1 << 24) as ws:
            peer = Played(ws)
            await peer.until("beat")
            node.node.engine.call_timeout = 1e-6  # no answer comes that fast
            await ws.send_message(wire.message(
                "lease", {"profile": Profile(), "near": None}, lid="l1", strict=False,
                timeout=5.0, image=images.busybox, configured=False,
                sizes={"min_idle": 0, "max": 1}))
            header, _ = await peer.until("failed", "l1")
            assert "did not answer" in header["error"], header
            node.node.engine.call_timeout = 30.0
            await ws.send_message(wire.message("image_has", rid="h1", image=images.busybox))
            header, _ = await peer.until("image")
            assert header["rid"] == "h1" and header["id"], header


async def test_on_one_machine_nothing_changes(start_server, python_config):
    client = await start_server(python_config())
    with trio.fail_after(60):
        [only] = (await client.get("/nodes")).json()
        assert only["local"] and only["state"] == "ready" and only["url"] is None
        record = (await client.post("/fn?wait=30", json=python("print(1)"))).json()
        assert record["status"] == "succeeded" and record["node"] is None
        assert {p["node"] for p in (await client.get("/pools")).json()} == {None}


def test_cluster_settings_come_from_toml_and_the_environment(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    toml = tmp_path / "front.toml"
    toml.write_text(f'[cluster]\nnodes = ["ws://10.0.0.2:8001"]\ntoken_file = "{secret}"\n')
    config = Config.load(toml, environ={"UFAAS_CLUSTER_HEARTBEAT": "0.5"})
    assert config.cluster.nodes == ["ws://10.0.0.2:8001"] and config.cluster.enabled
    assert config.cluster.secret() == "from-a-file" and config.cluster.heartbeat == 0.5
    env = Config.load(None, environ={"UFAAS_CLUSTER_NODES": "ws://a:1, ws://b",
                                     "UFAAS_CLUSTER_SWARM_SERVICE": "ufaas-node"}).cluster
    assert env.nodes == ["ws://a:1", "ws://b"] and env.swarm_service == "ufaas-node"
    assert not Config.load(None, environ={}).cluster.enabled
    for bad in ("http://a:1", "ws://", "ws://a:1/path", "ws://a:notaport"):
        with pytest.raises(ConfigError, match="cluster"):
            Config.load(None, environ={"UFAAS_CLUSTER_NODES": bad})
    with pytest.raises(ConfigError, match="token_file"):
        Config.load(None, environ={"UFAAS_CLUSTER_TOKEN_FILE": str(tmp_path / "missing")})


def test_ufaas_node_refuses_to_start_without_a_token():
    from command import ufaas_command

    env = {k: v for k, v in os.environ.items() if not k.startswith("UFAAS_")}
    done = subprocess.run([*ufaas_command(), "node", "--port", "0"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and "needs the cluster's token" in done.stderr, done.stderr
    helped = subprocess.run([*ufaas_command(), "node", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--token-file" in helped.stdout


async def test_a_node_sweeps_stopped_containers_and_names_a_stale_listing_once(
        start_node, docker_client, images, test_labels, monkeypatch, caplog):
    """The node's sweep removes a stopped container of its own and says so once. A
    container the engine lists but does not have (Docker 20.10 can keep one listed after
    a restart, when its restore and an auto-removal cross) is not counted as removed, and
    is named in the log once however many sweeps find it."""
    import ufaas.node
    from pool import ContainerInfo

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(ufaas.node, "SWEEP_EVERY", 0.1)
    node = await start_node("node-a")
    stopped = docker_client.containers.run(
        images.busybox, ["true"], labels={**test_labels, "ufaas.node": node.name},
        detach=True)
    stopped.wait(timeout=30)  # "exited"
    ghost = "0123456789ab" * 5 + "cdef"
    engine = node.node.engine
    listing = engine.containers

    async def containers(labels):
        found = await listing(labels)
        if labels == {"ufaas.node": node.name}:  # the sweep's
            found.append(ContainerInfo(ghost, "dead", {"ufaas.node": node.name}, 0.0))
        return found

    monkeypatch.setattr(engine, "containers", containers)

    def said(text):
        return [r for r in caplog.records if r.name == "ufaas.node" and text in r.getMessage()]

    with trio.fail_after(30):
        while not said("has no such container"):
            await trio.sleep(0.05)
        sweeps = engine._calls
        while engine._calls < sweeps + 20:  # ten sweeps more
            await trio.sleep(0.05)
    assert [r.getMessage() for r in said("has no such container")] == [
        f"the engine lists container {ghost[:12]} but has no such container: a stale entry "
        "of its own, gone when the engine restarts"]
    assert [r.getMessage() for r in said("removed")] == [
        "removed 1 containers of this node's that had stopped"]
    assert docker_client.containers.list(all=True, filters={"id": stopped.id}) == []


async def test_a_function_whose_node_is_lost_before_its_run_went_runs_on_another(
        start_node, front_config, start_server, make_site):
    """A function holds a lease on a node, which is lost before the function's run went
    (here while it fetches a URL, which it does inside the lease as its spec waited on
    disk): nothing ran, so it waits again, as a function that never started, and runs on
    the other node, once."""
    go = threading.Event()

    def gated(request):
        go.wait(30)
        sites.send(b"print('ran')\n")(request)

    site = make_site({"/main.py": gated})
    a, b = await start_node("node-a"), await start_node("node-b")
    client = await start_server(front_config(
        [a.url, b.url], pending_bytes=0, fetch_allow=["127.0.0.1/32"]))
    try:
        with trio.fail_after(60):
            await wait_nodes(client, [a.name, b.name])
            await wait_warm(client, a.name)
            await wait_warm(client, b.name)
            fn = (await client.post("/fn", json={
                "image": "ufaas-test/python", "command": ["python3", "main.py"],
                "resources": [{"path": "main.py", "url": f"{site.url}/main.py"}]})).json()
            while not site.requests["/main.py"]:  # leased, and fetching
                await trio.sleep(0.02)
            while not (busy := [p["node"] for p in (await client.get("/pools")).json()
                                if p["busy"]]):
                await trio.sleep(0.02)
            (holder,) = busy
            lost, other = (a, b) if holder == a.name else (b, a)
            lost.stop()
            await wait_nodes(client, [lost.name], state="lost")
            go.set()
            done = (await client.get(f"/fn/{fn['id']}?wait=30")).json()
    finally:
        go.set()
    assert (done["status"], done["node"], done["stdout"]) == ("succeeded", other.name,
                                                              "ran\n"), done
