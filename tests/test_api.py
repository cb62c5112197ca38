"""The REST API over real HTTP against the real server on port 0 and a real engine."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import pytest
import sites
import trio

from ufaas.config import PoolConfig

TOOL = b"def tool():\n    return 'tool ok'\n"


def spec(images, command, **kw):
    return {"image": images.python, "command": command, **kw}


async def test_run_and_read_back(start_server, python_config, images):
    with trio.fail_after(60):
        client = await start_server(python_config())
        r = await client.post("/fn?wait=20", json=spec(images, ["echo", "hi"]))
        assert r.status_code == 200, r.text
        rec = r.json()
        assert r.headers["Location"] == f"/fn/{rec['id']}"
        assert rec["status"] == "succeeded" and rec["stdout"] == "hi\n"
        assert rec["exit_code"] == 0 and rec["error"] is None
        assert len(rec["container"]) == 12 and rec["locality"] is None
        assert rec["created_at"].endswith("Z") and rec["duration_ms"] >= 0
        for key in ("spec", "after", "signal", "stderr", "truncated", "started_at",
                    "finished_at"):
            assert key in rec
        assert (await client.get(f"/fn/{rec['id']}")).json() == rec

        r = await client.post("/fn", json=spec(images, "echo slow; sleep 1; exit 3"))
        assert r.status_code == 202
        slow = r.json()
        assert slow["status"] in ("pending", "running")
        active = (await client.get("/fn")).json()
        assert [f["id"] for f in active] == [slow["id"]]
        done = (await client.get(f"/fn/{slow['id']}?wait=10")).json()
        assert done["status"] == "failed" and done["exit_code"] == 3
        assert done["stdout"] == "slow\n"
        assert (await client.get("/fn")).json() == []
        everything = (await client.get("/fn?status=all")).json()
        assert [f["id"] for f in everything] == [slow["id"], rec["id"]]
        assert [f["id"] for f in (await client.get("/fn?status=all&limit=1")).json()] == [
            slow["id"]]
        assert [f["id"] for f in (await client.get("/fn?status=failed")).json()] == [
            slow["id"]]


async def test_spec_example_with_url_resource(start_server, python_config, images, make_site):
    base = make_site({"/tool.py": sites.send(TOOL)}).url
    body = {
        "image": images.python,
        "command": ["python3", "main.py"],
        "resources": [
            {"path": "main.py", "text": "import sys\nsys.path.insert(0, 'lib')\nimport tool\n"
             "print(open('data.bin','rb').read())\nprint(tool.tool())\n"
             "import os\nprint(os.environ['NAME'], sys.stdin.read())\n"},
            {"path": "data.bin", "base64": "AAEC"},
            {"path": "lib/tool.py", "url": f"{base}/tool.py",
             "sha256": hashlib.sha256(TOOL).hexdigest()},
            {"path": "run.sh", "text": "echo hi", "mode": "0755"},
        ],
        "env": {"NAME": "value"},
        "stdin": "optional text",
        "timeout": 30,
        "network": False,
    }
    with trio.fail_after(60):
        client = await start_server(python_config(fetch_allow=["127.0.0.1/32"]))
        rec = (await client.post("/fn?wait=20", json=body)).json()
        assert rec["status"] == "succeeded", rec
        assert rec["stdout"] == "b'\\x00\\x01\\x02'\ntool ok\nvalue optional text\n"
        follow = (await client.post(f"/fn/{rec['id']}?wait=20", json={
            "command": "./run.sh; stat -c %a run.sh; echo $UFAAS_WORKDIR"})).json()
        lines = follow["stdout"].split()
        assert lines[:2] == ["hi", "755"] and lines[2].startswith("/tmp/ufaas/")
        bad = body | {"resources": [{"path": "x", "url": f"{base}/tool.py",
                                     "sha256": "0" * 64}]}
        rec = (await client.post("/fn?wait=20", json=bad)).json()
        assert rec["status"] == "error" and "sha256" in rec["error"]


async def test_locality_hit_miss_strict(start_server, python_config, images, docker_client):
    with trio.fail_after(60):
        client = await start_server(python_config())
        first = (await client.post("/fn?wait=20", json=spec(
            images, "echo cached > cache.txt"))).json()
        # image omitted: inherited from the function it follows
        hit = (await client.post(f"/fn/{first['id']}?wait=20", json={
            "command": ["cat", "cache.txt"]})).json()
        assert hit["locality"] == "hit" and hit["after"] == first["id"]
        assert hit["container"] == first["container"] and hit["stdout"] == "cached\n"
        # Unrelated functions never see it.
        other = (await client.post("/fn?wait=20", json=spec(
            images, "cat cache.txt; ls /tmp/ufaas"))).json()
        assert other["status"] == "failed" and "cached" not in other["stdout"]

        full = docker_client.containers.list(filters={"id": first["container"]})[0]
        full.remove(force=True)
        # Once the pool has noticed that the container is gone, strict is refused; until
        # then a strict follow-up is accepted (and fails in the dead container).
        with trio.fail_after(20):
            while (r := await client.post(f"/fn/{first['id']}?strict=true",
                                          json={"command": ["true"]})).status_code != 409:
                assert r.status_code == 202, r.text
                await trio.sleep(0.05)
        assert "gone" in r.json()["error"], r.text
        miss = (await client.post(f"/fn/{first['id']}?wait=20", json={
            "command": "cat cache.txt || echo gone"})).json()
        assert miss["locality"] == "miss" and miss["stdout"] == "gone\n"
        assert miss["container"] != first["container"]


async def test_put_pending_then_conflict(start_server, make_config, images):
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=1)])
    with trio.fail_after(60):
        client = await start_server(config)
        blocker = (await client.post("/fn", json=spec(images, ["sleep", "2"]))).json()
        waiting = (await client.post("/fn", json=spec(images, ["echo", "old"]))).json()
        assert waiting["status"] == "pending"
        while (await client.get(f"/fn/{blocker['id']}")).json()["status"] != "running":
            await trio.sleep(0.05)
        r = await client.put(f"/fn/{waiting['id']}", json={"command": ["echo", "new"],
                                                             "env": {"A": "1"}})
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["command"] == ["echo", "new"]
        r = await client.put(f"/fn/{waiting['id']}", json={"command": 5})
        assert r.status_code == 422 and "command" in r.json()["error"]
        # null resets a field, but a function cannot be left without an image.
        r = await client.put(f"/fn/{waiting['id']}", json={"image": None})
        assert r.status_code == 422 and r.json()["error"] == "image: required", r.text
        assert (await client.get(f"/fn/{waiting['id']}")).json()["spec"]["image"]
        r = await client.put(f"/fn/{blocker['id']}", json={"command": ["true"]})
        assert r.status_code == 409
        done = (await client.get(f"/fn/{waiting['id']}?wait=20")).json()
        assert done["status"] == "succeeded" and done["stdout"] == "new\n"
        r = await client.put(f"/fn/{waiting['id']}", json={"command": ["true"]})
        assert r.status_code == 409


async def test_put_moves_a_queued_function_to_another_pool(start_server, make_config, images):
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=1),
                                PoolConfig(image=images.busybox, min_idle=1, max=1)])
    with trio.fail_after(60):
        client = await start_server(config)
        blocker = (await client.post("/fn", json=spec(images, ["sleep", "30"]))).json()
        while (await client.get(f"/fn/{blocker['id']}")).json()["status"] != "running":
            await trio.sleep(0.05)
        queued = (await client.post("/fn", json=spec(images, ["echo", "moved"]))).json()
        assert queued["status"] == "pending"
        r = await client.put(f"/fn/{queued['id']}", json={"image": images.busybox})
        assert r.status_code == 200
        done = (await client.get(f"/fn/{queued['id']}?wait=10")).json()
        assert done["status"] == "succeeded" and done["stdout"] == "moved\n"
        assert (await client.get(f"/fn/{blocker['id']}")).json()["status"] == "running"
        await client.delete(f"/fn/{blocker['id']}")


async def test_delete_pending_running_finished(start_server, make_config, images,
                                               docker_client):
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=1)])
    with trio.fail_after(60):
        client = await start_server(config)
        running = (await client.post("/fn", json=spec(images, "sleep 30 & sleep 30"))).json()
        pending = (await client.post("/fn", json=spec(images, ["echo", "never"]))).json()
        while (await client.get(f"/fn/{running['id']}")).json()["status"] != "running":
            await trio.sleep(0.05)
        r = await client.delete(f"/fn/{pending['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        rec = (await client.delete(f"/fn/{running['id']}")).json()
        assert rec["status"] == "cancelled", rec
        # Its processes went with it: a follow-up in its container finds none of them.
        look = (await client.post(f"/fn/{running['id']}?wait=20&strict=true", json={
            "command": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"})).json()
        assert look["locality"] == "hit" and look["container"] == rec["container"], look
        assert "/proc/" in look["stdout"] and "sleep 30" not in look["stdout"], look["stdout"]
        never = (await client.get(f"/fn/{pending['id']}")).json()
        assert never["status"] == "cancelled" and never["started_at"] is None

        done = (await client.post("/fn?wait=20", json=spec(images, ["echo", "x"]))).json()
        again = (await client.delete(f"/fn/{done['id']}")).json()
        assert again["status"] == "succeeded" and again["stdout"] == "x\n"
        # container=remove destroys the container it ran in.
        # sparse: a full listing inspects each container, and one may go in between.
        assert docker_client.containers.list(sparse=True, filters={"id": done["container"]})
        rec = (await client.delete(f"/fn/{done['id']}?container=remove&purge=true")).json()
        assert rec["id"] == done["id"]
        assert (await client.get(f"/fn/{done['id']}")).status_code == 404
        for _ in range(50):
            if not docker_client.containers.list(all=True, sparse=True,
                                                 filters={"id": done["container"]}):
                break
            await trio.sleep(0.1)
        else:
            pytest.fail("container=remove left the container")
        ok = (await client.post("/fn?wait=20", json=spec(images, ["echo", "ok"]))).json()
        assert ok["stdout"] == "ok\n"


async def test_errors_then_still_serving(start_server, python_config, images):
    with trio.fail_after(60):
        client = await start_server(python_config())
        r = await client.post("/fn", content=b'{"image": ')
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        assert (await client.get(f"/fn/{uuid.uuid4()}")).status_code == 404
        assert (await client.get("/fn/not-a-uuid")).status_code == 404
        assert (await client.delete(f"/fn/{uuid.uuid4()}")).status_code == 404
        assert (await client.post(f"/fn/{uuid.uuid4()}", json={"command": ["a"]})
                ).status_code == 404
        # GET /fn has no wait: it ignores the parameter, as any it does not know.
        r = await client.get("/fn?wait=abc&surprise=1")
        assert r.status_code == 200 and r.json() == [], r.text
        assert (await client.get(f"/fn/{uuid.uuid4()}?wait=nan")).status_code == 400
        assert (await client.get("/fn?status=bogus")).status_code == 400
        assert (await client.get("/nowhere")).json()["error"]
        r = await client.post("/fn?wait=20", json=spec(images, ["echo", "alive"]))
        assert r.json()["stdout"] == "alive\n"


async def test_submissions_with_and_without_content_length(start_server, python_config,
                                                          images):
    """A body with Content-Length takes the server's fast path, a chunked one goes
    through Quart: both must give the same answers, errors included, and keep the
    connection usable."""

    def chunked(data: bytes):
        async def gen():
            yield data[:5]
            yield data[5:]
        return gen()

    with trio.fail_after(60):
        client = await start_server(python_config())
        good = json.dumps(spec(images, ["echo", "hi"])).encode()
        for content in (good, chunked(good)):
            r = await client.post("/fn?wait=20", content=content)
            assert r.status_code == 200 and r.json()["stdout"] == "hi\n", r.text
            assert r.headers["location"] == f"/fn/{r.json()['id']}"
            first = r.json()["id"]
        r = await client.post(f"/fn/{first}?wait=20&strict=true", content=chunked(good))
        assert r.status_code == 200 and r.json()["after"] == first
        r = await client.post(f"/fn/{first}?wait=20&strict=true", content=good)
        assert r.status_code == 200 and r.json()["locality"] == "hit"
        r = await client.post("/fn?wait=0", content=good)
        assert r.status_code == 202 and r.json()["status"] in ("pending", "running")
        bad = json.dumps({"image": images.python, "command": []}).encode()
        for content in (bad, chunked(bad)):
            r = await client.post("/fn", content=content)
            assert r.status_code == 422 and r.json()["error"].startswith("command"), r.text
        for content in (b"{nope", chunked(b"{nope")):
            r = await client.post("/fn", content=content)
            assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = await client.post("/fn?wait=-1", content=good)
        assert r.status_code == 400 and "wait" in r.json()["error"]
        r = await client.post(f"/fn/{uuid.uuid4()}?wait=5", content=good)
        assert r.status_code == 404
        r = await client.post("/fn?wait=20", content=good)
        assert r.status_code == 200 and r.json()["stdout"] == "hi\n"


async def test_queue_bound_pools_health(start_server, make_config, images):
    config = make_config(queue_limit=1,
                         pools=[PoolConfig(image=images.python, min_idle=1, max=1)])
    with trio.fail_after(60):
        client = await start_server(config)
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        first = (await client.post("/fn", json=spec(images, ["sleep", "1"]))).json()
        while (await client.get(f"/fn/{first['id']}")).json()["status"] != "running":
            await trio.sleep(0.05)
        second = await client.post("/fn", json=spec(images, ["echo", "2"]))
        assert second.status_code == 202
        third = await client.post("/fn", json=spec(images, ["echo", "3"]))
        assert third.status_code == 429 and third.headers["Retry-After"]
        pools = (await client.get("/pools")).json()
        (p,) = pools
        assert p["image"] == images.python and p["max"] == 1 and p["busy"] == 1
        assert p["queued"] == 1 and p["profile"]["network"] is False
        for rec in (first, second.json()):
            assert (await client.get(f"/fn/{rec['id']}?wait=20")).json()["status"] == \
                "succeeded"


async def test_base64_and_binary_output(start_server, python_config, images):
    data = bytes(range(256)) * 100
    with trio.fail_after(60):
        client = await start_server(python_config())
        rec = (await client.post("/fn?wait=20", json=spec(
            images, ["sha256sum", "blob"],
            resources=[{"path": "blob", "base64": base64.b64encode(data).decode()}]))).json()
        assert rec["stdout"].split()[0] == hashlib.sha256(data).hexdigest()
