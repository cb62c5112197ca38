"""A front and ``ufaas node`` on each machine of a lab Swarm (tests/lab.py): whole machines
power-cut, their engines killed, hung and cut off the network mid-run, the front killed,
and the real stack deployed with ``docker stack deploy``. One lab serves the session; each
test undoes its faults (``healthy_lab``)."""

from __future__ import annotations

import logging
import signal

import httpx
import pytest
import trio
from command import Server
from conftest import NODE_BEATS, NODE_TOKEN
from test_cluster import python, wait_nodes, wait_status, wait_warm

from ufaas.config import PoolConfig
from ufaas.node import SWEEP_EVERY
from ufaas.server import home

pytestmark = pytest.mark.slow

VICTIM = 3  # the lab node each fault hits (node 1 is the Swarm's manager)


def one_each(images) -> list[PoolConfig]:
    """One warm container per node and no more: three functions fill the lab."""
    return [PoolConfig(image=images.python, min_idle=1, max=1)]


async def fill(client, nodes):
    """A long function running on each node: {node: its record}."""
    started = [(await client.post("/fn", json=python(
        "import time; print('started', flush=True); time.sleep(300)"))).json()
        for _ in nodes]
    running = [await wait_status(client, f["id"], ("running",), timeout=60) for f in started]
    by_node = {r["node"]: r for r in running}
    assert set(by_node) == set(nodes), running
    return by_node


FAULTS = {
    # name: (cause it on lab node n, undo it)
    "power cut": (lambda lab, n: lab.kill(n), lambda lab, n: lab.start(n)),
    "engine killed": (lambda lab, n: lab.kill_engine(n), lambda lab, n: None),
    "hung": (lambda lab, n: lab.pause(n), lambda lab, n: lab.unpause(n)),
    "partitioned": (lambda lab, n: lab.disconnect(n), lambda lab, n: lab.connect(n)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_node_fault_mid_run(fault, healthy_lab, start_server, front_config, images):
    """Its running function ends ``error`` naming it; the functions queued behind the
    running ones run elsewhere, each once; new work goes elsewhere; once it is back the
    node is used again, and what its earlier run of ``ufaas node`` left is gone."""
    lab = healthy_lab
    cause, undo = FAULTS[fault]
    victim = lab.name(VICTIM)
    config = front_config(lab.urls, pools=one_each(images))
    client = await start_server(config)
    with trio.fail_after(240):
        await wait_nodes(client, lab.node_names, timeout=60)
        for name in lab.node_names:
            await wait_warm(client, name)
        running = await fill(client, lab.node_names)
        # Queued: every container is busy, so these wait for one, on some node.
        queued = [(await client.post("/fn", json=python(f"print('queued {i}')"))).json()
                  for i in range(3)]
        await trio.to_thread.run_sync(cause, lab, VICTIM)
        lost = (await client.get(f"/fn/{running[victim]['id']}?wait=30")).json()
        assert lost["status"] == "error" and f"node {victim}" in lost["error"], lost
        assert lost["stdout"] == "started\n"  # what it printed before is kept
        if fault != "engine killed":
            # The node is lost. A killed engine is told by the node itself ("container
            # stopped while the function ran"), which the new engine then restarts.
            state = {n["name"]: n["state"] for n in (await client.get("/nodes")).json()}
            assert state[victim] != "ready", state
        new = (await client.post("/fn", json=python("print('new')"))).json()
        # The others end; the queue and the new function run on them, each once.
        for name, record in running.items():
            if name != victim:
                await client.delete(f"/fn/{record['id']}")
        done = [(await client.get(f"/fn/{f['id']}?wait=60")).json() for f in [*queued, new]]
        assert [(d["status"], d["stdout"]) for d in done] == [
            ("succeeded", f"queued {i}\n") for i in range(3)] + [("succeeded", "new\n")], done
        if fault != "engine killed":  # (there, the node may be back already)
            assert victim not in {d["node"] for d in done}, done
        # Back: used again, and nothing of before the fault is left on it.
        await trio.to_thread.run_sync(undo, lab, VICTIM)
        await wait_nodes(client, [victim], timeout=90)
        await wait_warm(client, victim)
        spread = [(await client.post("/fn", json=python("import time; time.sleep(2)"))).json()
                  for _ in lab.node_names]
        ends = [(await client.get(f"/fn/{f['id']}?wait=60")).json() for f in spread]
        assert victim in {e["node"] for e in ends} and {e["status"] for e in ends} == {
            "succeeded"}, ends
        assert (await client.get(f"/fn/{lost['id']}")).json()["status"] == "error"
        # What ran there before the fault is gone: no container of the node's is left
        # stopped, and this front's are no more than its pool may hold. (Earlier tests'
        # fronts may still have theirs there, for front_grace.)
        # A removal the engine failed leaves a container "dead": the node sweeps those
        # every SWEEP_EVERY seconds.
        with trio.move_on_after(2 * SWEEP_EVERY + 5):
            while not all(c["State"] == "running" for c in lab.containers(
                    VICTIM, f"ufaas.node={victim}")):
                await trio.sleep(0.5)
        left = lab.containers(VICTIM, f"ufaas.node={victim}")
        assert all(c["State"] == "running" for c in left), left
        ours = [c for c in left if f"ufaas.home={home(config.db)}-{victim}" in c["Labels"]]
        assert len(ours) <= 1, ours


def front_env(lab) -> dict[str, str]:
    """A front, as the ``ufaas`` command reads it, whose nodes are the lab's."""
    return {"UFAAS_CLUSTER_NODES": ",".join(lab.urls), "UFAAS_CLUSTER_TOKEN": NODE_TOKEN,
            "UFAAS_CLUSTER_LOCAL": "false",
            **{f"UFAAS_CLUSTER_{k.upper()}": str(v) for k, v in NODE_BEATS.items()}}


async def test_a_killed_front_comes_back_with_its_records(healthy_lab, tmp_path):
    """``kill -9`` of the front mid-run: the nodes kill what it ran (its connection is
    gone), the next run of it (the same database) keeps every record, ends the running
    function ``error`` (interrupted: it never completes), and the nodes remove the first
    run's containers."""
    lab = healthy_lab
    args, env = ["--port", "0", "--db", str(tmp_path / "front.db")], front_env(lab)
    first = Server(tmp_path, "front-1", args, env)
    try:
        async with httpx.AsyncClient(base_url=await first.ready(), timeout=60) as client:
            with trio.fail_after(120):
                await wait_nodes(client, lab.node_names, timeout=60)
                done = (await client.post("/fn?wait=60", json=python("print('before')"))
                        ).json()
                assert done["status"] == "succeeded", done
                started = (await client.post("/fn", json=python(
                    "import time; print('started', flush=True); time.sleep(300)"))).json()
                await wait_status(client, started["id"], ("running",), timeout=60)
        old = {n: {c["ID"] for c in lab.containers(n, f"ufaas.home={home(args[3])}-"
                                                      f"{lab.name(n)}")}
               for n in range(1, lab.nodes + 1)}
        assert any(old.values()), old
    finally:
        first.stop(signal.SIGKILL)
    second = Server(tmp_path, "front-2", args, env)
    try:
        async with httpx.AsyncClient(base_url=await second.ready(), timeout=60) as client:
            with trio.fail_after(120):
                kept = (await client.get(f"/fn/{done['id']}")).json()
                assert (kept["status"], kept["stdout"]) == ("succeeded", "before\n"), kept
                ended = (await client.get(f"/fn/{started['id']}")).json()
                assert ended["status"] == "error" and "interrupted" in ended["error"], ended
                await wait_nodes(client, lab.node_names, timeout=60)
                while any(c["ID"] in old[n] for n in old for c in lab.containers(
                        n, f"ufaas.home={home(args[3])}-{lab.name(n)}")):
                    await trio.sleep(0.2)
                after = (await client.post("/fn?wait=60", json=python("print('after')"))
                         ).json()
                assert (after["status"], after["stdout"]) == ("succeeded", "after\n"), after
    finally:
        assert second.stop() == 0


async def test_an_image_a_node_lacks_is_streamed_to_it(healthy_lab, start_server, front_config,
                                                       images, caplog):
    """No registry: a node that lacks an image gets it from a node that has it (docker
    save into docker load), within image_max_bytes; until then its functions run on
    the nodes that have it."""
    caplog.set_level(logging.INFO, logger="ufaas.cluster")
    lab, lacking = healthy_lab, 3
    have = lab.docker(1, "image", "inspect", "-f", "{{.Id}}", images.busybox)
    lab.docker(lacking, "rmi", "-f", images.busybox)
    pools = [PoolConfig(image=images.busybox, min_idle=1, max=1)]
    urls, names = [lab.node_url(1), lab.node_url(lacking)], [lab.name(1), lab.name(lacking)]
    two = {"image": images.busybox, "command": "sleep 1; echo ran"}
    with trio.fail_after(180):
        # Too big for the limit: refused, and the work goes to the node that has it.
        small = await start_server(front_config(urls, pools=pools,
                                                cluster={"image_max_bytes": 1 << 20}))
        await wait_nodes(small, names, timeout=60)
        ran = [(await small.post("/fn", json=two)).json() for _ in range(2)]
        ends = [(await small.get(f"/fn/{f['id']}?wait=60")).json() for f in ran]
        assert [(e["status"], e["node"]) for e in ends] == [("succeeded", names[0])] * 2, ends
        assert any("more than image_max_bytes" in r.getMessage() for r in caplog.records)
        assert lab.docker(lacking, "image", "inspect", images.busybox, check=False) == "[]"
        # Within it: streamed once, and used there.
        client = await start_server(front_config(urls, pools=pools))
        await wait_nodes(client, names, timeout=60)
        while lab.docker(lacking, "image", "inspect", "-f", "{{.Id}}", images.busybox,
                         check=False) != have:
            await trio.sleep(0.2)
        await wait_warm(client, names[1])
        ran = [(await client.post("/fn", json=two)).json() for _ in range(2)]
        ends = [(await client.get(f"/fn/{f['id']}?wait=60")).json() for f in ran]
        assert {(e["status"], e["stdout"]) for e in ends} == {("succeeded", "ran\n")}, ends
        assert {e["node"] for e in ends} == set(names), ends
    said = [r.getMessage() for r in caplog.records]
    assert sum(f"streamed from {names[0]} to {names[1]}" in m for m in said) == 1, said
