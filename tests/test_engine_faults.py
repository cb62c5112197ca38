"""Infrastructure faults and load: killed containers, an engine restart, 2,000 functions."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import httpx
import pytest
import trio

from ufaas.config import PoolConfig


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def wait_status(client, fid, wanted, timeout=20):
    with trio.fail_after(timeout):
        while (rec := (await client.get(f"/fn/{fid}")).json())["status"] not in wanted:
            await trio.sleep(0.05)
    return rec


async def test_container_killed_mid_function(start_server, make_config, images, docker_client):
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=2)])
    with trio.fail_after(60):
        client = await start_server(config)
        victim = (await client.post("/fn", json={"image": images.python,
                                                 "command": ["sleep", "30"]})).json()
        bystander = (await client.post("/fn", json={"image": images.python,
                                                    "command": "sleep 2; echo fine"})).json()
        rec = await wait_status(client, victim["id"], ("running",))
        await wait_status(client, bystander["id"], ("running",))
        full_id = docker_client.containers.list(filters={"id": rec["container"]})[0].id
        await trio.to_thread.run_sync(lambda: docker_client.containers.get(full_id).kill())
        # Ended by the loss of its container, long before its 30 s sleep would end it.
        rec = (await client.get(f"/fn/{victim['id']}?wait=10")).json()
        assert rec["status"] == "error" and "container" in rec["error"], rec
        other = (await client.get(f"/fn/{bystander['id']}?wait=10")).json()
        assert other["status"] == "succeeded" and other["stdout"] == "fine\n"
        after = (await client.post("/fn?wait=20", json={"image": images.python,
                                                        "command": ["echo", "refilled"]})).json()
        assert after["stdout"] == "refilled\n" and after["container"] != rec["container"]


def _dockerd_pids() -> list[int]:
    """This machine's dockerd: the lab's nodes (tests/lab.py) run dockerds too, which show
    in /proc but live in PID namespaces of their own, and are not this test's to stop."""
    pids = []
    ours = os.readlink("/proc/self/ns/pid")
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().split()
                if os.readlink(f"/proc/{name}/ns/pid") != ours:
                    continue
            except OSError:
                continue
            # A zombie is gone for our purposes, however long it waits to be reaped.
            if fields[1] == "(dockerd)" and fields[2] != "Z":
                pids.append(int(name))
    return pids


def _start_dockerd() -> None:
    # As .ci/run starts it: its own session, so it outlives this test process.
    with open("/var/log/dockerd.log", "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True)


def _engine_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or os.environ.get("DOCKER_HOST", "unix://").find("unix")
                    < 0, reason="needs root and the local engine to restart it")
async def test_engine_restart_mid_run(start_server, make_config, images):
    assert _dockerd_pids(), "the local dockerd is not running"
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=2)],
                         engine_timeout=5)
    with trio.fail_after(180):
        client = await start_server(config)
        inflight = (await client.post("/fn", json={"image": images.python,
                                                   "command": ["sleep", "60"]})).json()
        await wait_status(client, inflight["id"], ("running",))
        for pid in _dockerd_pids():
            os.kill(pid, signal.SIGTERM)
        try:
            with trio.fail_after(60):
                while _dockerd_pids():
                    await trio.sleep(0.2)
            rec = (await client.get(f"/fn/{inflight['id']}?wait=15")).json()
            assert rec["status"] == "error", rec
            health = await client.get("/healthz")
            assert health.status_code == 503 and health.json()["error"]
            queued = await client.post("/fn", json={"image": images.python,
                                                    "command": ["echo", "after restart"]})
            assert queued.status_code == 202 and queued.json()["status"] == "pending"
        finally:
            await trio.to_thread.run_sync(_start_dockerd)
            with trio.fail_after(60):
                while not await trio.to_thread.run_sync(_engine_up):
                    await trio.sleep(0.5)
        rec = (await client.get(f"/fn/{queued.json()['id']}?wait=60")).json()
        assert rec["status"] == "succeeded" and rec["stdout"] == "after restart\n", rec
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.slow
async def test_two_thousand_functions_from_64_clients(start_server, make_config, images):
    total, clients = 2000, 64
    config = make_config(queue_limit=32, max_wait=60,
                         pools=[PoolConfig(image=images.python, min_idle=4, max=4)])
    results: dict[int, dict] = {}
    refused = 0
    with trio.fail_after(600):
        client = await start_server(config)
        url = str(client.base_url)
        await client.post("/fn?wait=20", json={"image": images.python, "command": ["true"]})
        rss_before = rss_bytes()
        todo = iter(range(total))

        async def worker():
            nonlocal refused
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(base_url=url, timeout=90, limits=limits) as http:
                for i in todo:
                    while True:
                        r = await http.post("/fn?wait=60", json={
                            "image": images.python, "command": ["echo", str(i)]})
                        if r.status_code == 429:
                            assert r.headers["Retry-After"]
                            refused += 1
                            await trio.sleep(0.05)
                            continue
                        break
                    rec = r.json()
                    while rec["status"] in ("pending", "running"):
                        rec = (await http.get(f"/fn/{rec['id']}?wait=30")).json()
                    results[i] = rec

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(worker)
        growth = rss_bytes() - rss_before
    assert sorted(results) == list(range(total))
    assert len({r["id"] for r in results.values()}) == total
    bad = [(i, r["status"], r["stdout"]) for i, r in results.items()
           if r["status"] != "succeeded" or r["stdout"] != f"{i}\n"]
    assert bad == []
    assert refused > 0, "the queue bound never answered 429"
    # Every function was recorded once: a listing gives at most max_list (1000) of them,
    # its Link header the rest.
    stored, path = [], "/fn?status=all&limit=1000"
    while path:
        r = await client.get(path)
        assert r.status_code == 200, r.text
        stored += [rec["id"] for rec in r.json()]
        link = r.headers.get("link")
        path = re.fullmatch(r'<(/fn\?[^>]+)>; rel="next"', link).group(1) if link else ""
    assert len(stored) == len(set(stored)) == total + 1
    assert growth < 150 << 20, f"server memory grew by {growth >> 20} MiB"
