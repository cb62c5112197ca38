"""Results out, through the real server: output files (record, routes, WebSocket, disk
budget, retention, purge) on both run paths, and callbacks to a real local receiver."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import tarfile
import time

import httpx
import pytest
import sites
import trio
from command import ThreadedServer
from test_ws import connect, run, until_exit

from ufaas.config import PoolConfig
from ufaas.files import FileStore, Gone

MAKE = ("mkdir -p out/sub && printf 'a,b\\n1,2\\n' > out/t.csv && printf '3\\n' > out/sub/u.csv "
        "&& printf '\\211PNG' > result.png && printf '<script>x</script>' > page.html && "
        "printf 'left alone' > other.txt")
OUTPUTS = ["out/**/*.csv", "result.png", "page.html", "absent.bin"]


@pytest.fixture(params=["python", "busybox"])
def kind(request):
    return request.param


@pytest.fixture
def files_config(make_config, images, kind):
    def make(**kw):
        kw.setdefault("pools", [PoolConfig(image=getattr(images, kind), min_idle=1, max=2)])
        return make_config(**kw)
    return make


def spec(images, kind, command=MAKE, **kw):
    return {"image": getattr(images, kind), "command": command, "outputs": OUTPUTS, **kw}


async def test_files_are_listed_served_and_tarred(start_server, files_config, images, kind):
    client = await start_server(files_config())
    answer = await client.post("/fn?wait=60", json=spec(images, kind))
    record = answer.json()
    assert answer.status_code == 200 and record["status"] == "succeeded", record
    contents = {"out/sub/u.csv": b"3\n", "out/t.csv": b"a,b\n1,2\n", "page.html":
                b"<script>x</script>", "result.png": b"\x89PNG"}
    assert record["files"] == [
        {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "truncated": False} for path, data in sorted(contents.items())]
    assert record["files_truncated"] is False
    fid = record["id"]
    for path, data in contents.items():
        one = await client.get(f"/fn/{fid}/files/{path}")
        assert one.status_code == 200 and one.content == data
        assert one.headers["Content-Length"] == str(len(data))
    png = await client.get(f"/fn/{fid}/files/result.png")
    assert png.headers["Content-Type"] == "image/png"
    csv = await client.get(f"/fn/{fid}/files/out/t.csv")
    assert csv.headers["Content-Type"].startswith("text/csv")
    # What a function wrote never runs as this server's page.
    html = await client.get(f"/fn/{fid}/files/page.html")
    assert html.headers["Content-Security-Policy"] == "sandbox"
    assert html.headers["X-Content-Type-Options"] == "nosniff"

    tar = await client.get(f"/fn/{fid}/files")
    assert tar.status_code == 200 and tar.headers["Content-Type"] == "application/x-tar"
    assert int(tar.headers["Content-Length"]) == len(tar.content)
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert got == contents

    missing = await client.get(f"/fn/{fid}/files/other.txt")
    assert missing.status_code == 404 and "other.txt" in missing.json()["error"]
    plain = (await client.post("/fn?wait=60", json={"image": getattr(images, kind),
                                                    "command": "true"})).json()
    assert "files" not in plain
    none = await client.get(f"/fn/{plain['id']}/files")
    assert none.status_code == 404 and "no output files" in none.json()["error"]


async def test_the_exit_event_lists_the_files(start_server, files_config, images, kind):
    client = await start_server(files_config())
    async with connect(client) as ws:
        fid = await run(ws, spec(images, kind))
        events = await until_exit(ws, fid)
    end = events[-1]
    assert end["status"] == "succeeded"
    assert [f["path"] for f in end["files"]] == ["out/sub/u.csv", "out/t.csv", "page.html",
                                                 "result.png"]
    assert end["files_truncated"] is False


async def test_running_files_conflict_and_bad_outputs_refused(start_server, python_config,
                                                            images):
    client = await start_server(python_config())
    running = (await client.post("/fn", json={
        "image": images.python, "command": "echo x > a.txt; sleep 30",
        "outputs": ["a.txt"]})).json()
    early = await client.get(f"/fn/{running['id']}/files/a.txt")
    assert early.status_code == 409 and "when it ends" in early.json()["error"]
    await client.delete(f"/fn/{running['id']}")
    for outputs, field in ((["../etc/passwd"], "outputs.0"), (["/abs"], "outputs.0"),
                           (["a"] * 65, "outputs"), ("a.txt", "outputs")):
        bad = await client.post("/fn", json={"image": images.python, "command": "true",
                                             "outputs": outputs})
        assert bad.status_code == 422, bad.text
        assert bad.json()["detail"][0]["field"] == field
    assert (await client.get("/healthz")).status_code == 200


async def test_disk_budget_cuts_and_purge_frees(start_server, python_config, images,
                                                tmp_path):
    files_dir = tmp_path / "kept"
    client = await start_server(python_config(files_max_bytes=1500, files_dir=str(files_dir)))
    make = {"image": images.python, "command": "head -c 1000 /dev/zero > a.bin",
            "outputs": ["a.bin"]}
    first = (await client.post("/fn?wait=60", json=make)).json()
    second = (await client.post("/fn?wait=60", json=make)).json()
    assert first["files"][0]["size"] == 1000 and not first["files"][0]["truncated"]
    assert second["files"][0] == {"path": "a.bin", "size": 500, "truncated": True,
                                  "sha256": hashlib.sha256(bytes(500)).hexdigest()}
    assert "files_max_bytes" in second["files_error"]
    cut = await client.get(f"/fn/{second['id']}/files/a.bin")
    assert cut.content == bytes(500)
    # A purge takes the files with the record, and gives their room back.
    purged = await client.delete(f"/fn/{first['id']}?purge=true")
    assert purged.status_code == 200
    assert not (files_dir / first["id"]).exists()
    assert (await client.get(f"/fn/{first['id']}/files/a.bin")).status_code == 404
    third = (await client.post("/fn?wait=60", json=make)).json()
    assert third["files"][0]["size"] == 1000 and not third["files"][0]["truncated"]


async def test_files_go_after_retention(start_server, python_config, images):
    client = await start_server(python_config(files_retention=1.0))
    record = (await client.post("/fn?wait=60", json={
        "image": images.python, "command": "echo kept > k.txt", "outputs": ["k.txt"]})).json()
    assert (await client.get(f"/fn/{record['id']}/files/k.txt")).content == b"kept\n"
    with trio.fail_after(30):
        while (answer := await client.get(f"/fn/{record['id']}/files/k.txt")).status_code \
                == 200:
            await trio.sleep(0.2)
    assert answer.status_code == 410 and "files_retention" in answer.json()["error"]
    tar = await client.get(f"/fn/{record['id']}/files")
    assert tar.status_code == 410
    # The record stays, and says what there was.
    assert (await client.get(f"/fn/{record['id']}")).json()["files"][0]["path"] == "k.txt"


# -- callbacks ---------------------------------------------------------------------------------

SECRET = "s3cret"


def received(site, path="/hook") -> list[tuple[dict[str, str], bytes]]:
    return [(headers, body) for p, headers, body in site.posted if p == path]


async def until_callback(client, fid, status="delivered", timeout=30):
    with trio.fail_after(timeout):
        while True:
            record = (await client.get(f"/fn/{fid}")).json()
            if record["callback"]["status"] == status:
                return record
            await trio.sleep(0.05)


async def test_callback_delivered_signed(start_server, python_config, images, make_site):
    site = make_site({"/hook": sites.send(b"thanks")})
    client = await start_server(python_config(fetch_allow=["127.0.0.1"],
                                              callback_secret=SECRET))
    created = (await client.post("/fn", json={
        "image": images.python, "command": "echo done",
        "callback": {"url": f"{site.url}/hook", "headers": {"Authorization": "Bearer rx"}}}
    )).json()
    assert created["callback"] == {"status": "pending", "attempts": 0, "last_error": None}
    # The record keeps the header names, never their values.
    assert created["spec"]["callback"] == {"url": f"{site.url}/hook",
                                           "headers": ["Authorization"]}
    record = await until_callback(client, created["id"])
    assert record["callback"] == {"status": "delivered", "attempts": 1, "last_error": None}
    [(headers, body)] = received(site)
    sent = json.loads(body)
    assert sent["id"] == created["id"] and sent["status"] == "succeeded"
    assert sent["stdout"] == "done\n"
    assert headers["Authorization"] == "Bearer rx"
    assert headers["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Ufaas-Signature"], expected)


async def test_callback_retried_after_errors_and_timeouts(start_server, python_config, images,
                                                          make_site):
    answers = sites.sequence(sites.status(500), sites.after(5, b"late"), sites.send(b"ok"))
    site = make_site({"/hook": answers, "/never": sites.status(503)})
    client = await start_server(python_config(fetch_allow=["127.0.0.1"], callback_timeout=0.5,
                                              callback_backoff=0.1, callback_attempts=3))
    ok, never = [(await client.post("/fn", json={
        "image": images.python, "command": "true",
        "callback": {"url": f"{site.url}/{path}"}})).json() for path in ("hook", "never")]
    record = await until_callback(client, ok["id"])
    assert record["callback"]["attempts"] == 3
    assert len(received(site)) == 3
    failed = await until_callback(client, never["id"], "failed")
    assert failed["callback"]["attempts"] == 3
    assert failed["callback"]["last_error"].startswith("HTTP 503")
    assert len(received(site, "/never")) == 3


def wait_for(check, timeout=30.0):
    """Poll ``check()`` (blocking) until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_callback_survives_restarts_and_the_policy_is_checked_again(
        python_config, images, make_site, test_labels, test_id):
    site = make_site({"/hook": sites.sequence(sites.status(500), sites.send(b"ok")),
                      "/refused": sites.status(500)})
    allowed = python_config(fetch_allow=["127.0.0.1"], callback_backoff=3.0)
    with ThreadedServer(allowed, instance=f"{test_id}-a", labels=test_labels) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        fid, refused = (http.post("/fn?wait=60", json={
            "image": images.python, "command": "true",
            "callback": {"url": f"{site.url}/{path}"}}).json()["id"]
            for path in ("hook", "refused"))
        wait_for(lambda: received(site) and received(site, "/refused"))
    # Stopped after the first attempts (500s): the next ones are due after the restart.
    assert len(received(site)) == 1
    with ThreadedServer(allowed, instance=f"{test_id}-b", labels=test_labels) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        record = wait_for(lambda: (r := http.get(f"/fn/{fid}").json())["callback"]["status"]
                          != "pending" and r)
        assert record["callback"] == {"status": "delivered", "attempts": 2,
                                      "last_error": None}
    assert len(received(site)) == 2
    # The same database, and an address policy that no longer allows 127.0.0.1: the next
    # attempt is refused where it connects, and so is a new callback when submitted.
    tried = len(received(site, "/refused"))
    strict = allowed.model_copy(update={"fetch_allow": []})
    with ThreadedServer(strict, instance=f"{test_id}-c", labels=test_labels) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        record = wait_for(lambda: (r := http.get(f"/fn/{refused}").json())["callback"][
            "status"] == "failed" and r)
        assert "loopback" in record["callback"]["last_error"], record
        at_submit = http.post("/fn", json={"image": images.python, "command": "true",
                                           "callback": {"url": f"{site.url}/hook"}})
        assert at_submit.status_code == 422
        assert at_submit.json()["detail"][0]["field"] == "callback.url"
    assert len(received(site, "/refused")) == tried


async def test_a_file_that_cannot_be_kept_is_said_so(tmp_path):
    store = FileStore(tmp_path, max_bytes=1 << 20, retention=60)
    await store.open()
    fid = "0f0e0d0c-0000-4000-8000-000000000000"
    (tmp_path / fid).write_text("a file where the directory goes")
    writer = store.writer(fid, 1000)
    assert store.granted == 1000
    await writer.on_file("a.txt", b"")
    await writer.on_file("a.txt", b"data")
    await writer.close()
    assert writer.failed is not None and "could not be kept" in writer.failed
    assert writer.kept(["a.txt"]) == []
    assert (store.granted, store.used) == (0, 0)
    with pytest.raises(ValueError):
        store.writer("../escape", 10)


async def test_files_removed_while_they_are_sent_come_whole(tmp_path):
    """Retention (or a purge) removes a function's files while an answer sends them: the
    answer holds them open from before it began, so a file or the tar comes whole, with
    the length it promised; once removed, the next answer is Gone. An answer's files are
    closed when it ends, and when it is closed before it began."""
    store = FileStore(tmp_path, max_bytes=8 << 20, retention=60)
    await store.open()
    fid = "0f0e0d0c-0000-4000-8000-000000000001"
    data = bytes(range(256)) * 8192  # 2 MiB, many chunks
    writer = store.writer(fid, len(data) + 10)
    for path, chunk in (("a.bin", data), ("b.txt", b"b\n")):
        await writer.on_file(path, b"")
        await writer.on_file(path, chunk)
    await writer.close()
    files = [{"path": "a.bin", "size": len(data)}, {"path": "b.txt", "size": 2}]

    single = await store.file(fid, 0, len(data))
    tar = await store.tar(fid, files)
    unread = await store.tar(fid, files)  # an answer that never begins
    first = await anext(single)
    await store.remove(fid)  # the answers under way
    assert not (tmp_path / fid).exists()
    got = first + b"".join([chunk async for chunk in single])
    assert got == data and single.length == len(data) and single.closed
    archive = b"".join([chunk async for chunk in tar])
    assert len(archive) == tar.length and tar.closed
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        assert [(m.name, opened.extractfile(m).read()) for m in opened.getmembers()] == [
            ("a.bin", data), ("b.txt", b"b\n")]
    assert not unread.closed
    await unread.aclose()  # as the HTTP server closes an answer it ends before its body
    assert unread.closed
    with pytest.raises(Gone):
        await store.file(fid, 1, 2)
    with pytest.raises(Gone):
        await store.tar(fid, files)
