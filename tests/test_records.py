"""Records as the API shows them, over real HTTP against the real server: one view of a
running function's output, answers that stay small whatever was sent, bounded listings."""

from __future__ import annotations

import hashlib
import re

import trio

from ufaas.config import PoolConfig

CAP = 60


def spec(images, command, **kw):
    return {"image": images.python, "command": command, **kw}


async def until(client, fid, predicate, timeout=20):
    with trio.fail_after(timeout):
        while not predicate(record := (await client.get(f"/fn/{fid}")).json()):
            await trio.sleep(0.02)
    return record


async def test_listing_and_record_agree_on_running_output(start_server, python_config, images):
    """The listing and the record of a running function show the same output, read from the
    same place; asking for one never changes what the other shows."""
    code = "import sys, time\nprint('a', flush=True)\ntime.sleep(60)\n"
    with trio.fail_after(CAP):
        client = await start_server(python_config())
        fid = (await client.post("/fn", json=spec(images, ["python3", "-c", code]))).json()["id"]
        await until(client, fid, lambda r: r["stdout"] == "a\n")
        for _ in range(3):
            (listed,) = [r for r in (await client.get("/fn")).json() if r["id"] == fid]
            shown = (await client.get(f"/fn/{fid}")).json()
            assert listed["status"] == shown["status"] == "running"
            assert listed["stdout"] == shown["stdout"] == "a\n"
        cancelled = (await client.delete(f"/fn/{fid}")).json()
        assert cancelled["status"] == "cancelled" and cancelled["stdout"] == "a\n"
        (listed,) = (await client.get("/fn?status=cancelled")).json()
        assert listed == (await client.get(f"/fn/{fid}")).json() == cancelled


async def test_answers_describe_content_without_it(start_server, python_config, images):
    big = "x" * (1 << 20)
    data = "stdin line\n" * 10_000
    body = spec(images, "sha256sum big.txt; wc -c", stdin=data,
                resources=[{"path": "big.txt", "text": big}])
    with trio.fail_after(CAP):
        client = await start_server(python_config(max_file_bytes=2 << 20))
        r = await client.post("/fn?wait=30", json=body)
        assert r.status_code == 200, r.text[:300]
        assert len(r.content) < 4096, len(r.content)
        record = r.json()
        digest = hashlib.sha256(big.encode()).hexdigest()
        assert record["stdout"].split()[0] == digest  # the function had the whole file
        assert record["stdout"].split()[2] == str(len(data))
        assert record["spec"]["resources"] == [
            {"path": "big.txt", "kind": "text", "mode": "0644", "size": len(big),
             "sha256": digest}]
        assert record["spec"]["stdin"] == {
            "size": len(data), "sha256": hashlib.sha256(data.encode()).hexdigest()}
        for path in (f"/fn/{record['id']}", "/fn?status=all"):
            assert len((await client.get(path)).content) < 4096, path
        full = (await client.get(f"/fn/{record['id']}?spec=full")).json()
        assert full["spec"] == body
        r = await client.get(f"/fn/{record['id']}?spec=everything")
        assert r.status_code == 400 and "'spec'" in r.json()["error"]


async def test_listings_are_bounded_and_pages_chain(start_server, python_config, images):
    """A listing never holds more than max_list records nor (past its first record) more than
    max_list_bytes; the Link header leads through the rest, each record once."""
    config = python_config(max_list=8, max_list_bytes=40_000)
    with trio.fail_after(CAP):
        client = await start_server(config)
        r = await client.get("/fn?status=all&limit=10000")
        assert r.status_code == 400 and "'limit'" in r.json()["error"]
        ids = []
        for i in range(12):
            # Each record's output is about 10 KB: a listing holds three or four.
            rec = (await client.post("/fn?wait=30", json=spec(
                images, ["python3", "-c", f"print('{i % 10}' * 10_000)"]))).json()
            assert rec["status"] == "succeeded", rec
            ids.append(rec["id"])
        seen, path, pages = [], "/fn?status=all&limit=8", 0
        while path:
            r = await client.get(path)
            assert r.status_code == 200
            page = r.json()
            assert 1 <= len(page) <= 8 and len(r.content) <= 40_000, (len(page), len(r.content))
            seen += [rec["id"] for rec in page]
            assert all(len(rec["stdout"]) == 10_001 for rec in page)
            link = r.headers.get("link")
            path = re.fullmatch(r'<(/fn\?[^>]+)>; rel="next"', link).group(1) if link else ""
            assert "limit=8" in path or not path
            pages += 1
        assert seen == ids[::-1] and pages >= 4
        r = await client.get("/fn?status=all&before=not-an-id")
        assert r.status_code == 404


async def test_strict_follow_up_in_another_pool_is_refused(start_server, make_config, images):
    config = make_config(pools=[PoolConfig(image=images.python, min_idle=1, max=1),
                                PoolConfig(image=images.busybox, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        first = (await client.post("/fn?wait=30", json=spec(images, "echo x > f"))).json()
        for change in ({"image": images.busybox}, {"network": True}):
            r = await client.post(f"/fn/{first['id']}?strict=true",
                                  json={"command": ["cat", "f"], **change})
            assert r.status_code == 409, r.text
            assert "strict" in r.json()["error"]
        hit = (await client.post(f"/fn/{first['id']}?strict=true&wait=30",
                                 json={"command": ["cat", "f"]})).json()
        assert hit["locality"] == "hit" and hit["stdout"] == "x\n"
        assert len([r for r in (await client.get("/fn?status=all")).json()]) == 2



async def test_a_waited_function_is_recorded_once_it_runs_long(start_server, python_config,
                                                               images):
    """A function sent with ?wait that starts at once is written when it ends, if soon
    (PERSIST_AFTER), else as running then: the listing (read from SQLite) shows it while it
    runs; one whose wait ends first is listed before its 202 comes back."""
    with trio.fail_after(CAP):
        client = await start_server(python_config())
        answers = []

        async def waited(body, wait):
            answers.append(await client.post(f"/fn?wait={wait}", json=body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waited, spec(images, "echo up; sleep 2"), 30)
            with trio.fail_after(10):
                while not (listed := (await client.get("/fn?status=running")).json()):
                    await trio.sleep(0.02)
        (done,) = answers
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        assert [r["id"] for r in listed] == [done.json()["id"]]
        assert listed[0]["started_at"] == done.json()["started_at"]

        r = await client.post("/fn?wait=0.01", json=spec(images, "sleep 30"))
        assert r.status_code == 202 and r.json()["status"] == "running", r.text
        assert [x["id"] for x in (await client.get("/fn")).json()] == [r.json()["id"]]
        await client.delete(f"/fn/{r.json()['id']}")

        quick = (await client.post("/fn?wait=30", json=spec(images, "echo hi"))).json()
        assert quick["status"] == "succeeded"
        (stored,) = (await client.get("/fn?status=succeeded&limit=1")).json()
        assert stored["id"] == quick["id"] and stored["stdout"] == "hi\n"
        assert (await client.get(f"/fn/{quick['id']}")).json() == quick
