"""Faults over real HTTP against the real server and real containers: bad input, runaway
functions, exposure of the token, a fuzz of the API, and the hardening of every container.

Each case ends with a function that runs fine (bad input: the module's last case does): a
fault must never outlive its function.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from urllib.parse import quote

import pytest
import sites
import trio
from command import ThreadedServer, module_server

from ufaas.config import PoolConfig

MiB = 1 << 20
CAP = 60  # seconds: the most any one test here may take


def fn(image, command, **kw):
    return {"image": image, "command": command, **kw}


def brief(rec):
    """The fields that explain a record, short enough for an assertion message."""
    keys = ("status", "exit_code", "signal", "oom", "truncated", "error", "container")
    return {**{k: rec.get(k) for k in keys},
            "stdout": rec.get("stdout", "")[-300:], "stderr": rec.get("stderr", "")[-300:]}


async def run(client, body, wait=30):
    r = await client.post(f"/fn?wait={wait}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# Every process of a function's uid but this shell and its parent (exec mode's wrapper),
# then what is in the temp dirs (the workdirs' root, only).
LEFT = ('for p in /proc/[0-9]*; do case "${p#/proc/}" in $$|$PPID) continue;; esac; '
        'while read -r k u _; do [ "$k" = Uid: ] && { [ "$u" != 0 ] && echo "${p#/proc/}"; '
        "break; }; done < $p/status; done; ls -A /tmp; ls -A /var/tmp; ls -A /dev/shm")


async def still_serves(client, image, after=None):
    """The next function runs fine, and the pools are healthy. After ``after``: if its
    container failed, in another container; if it kept its container (a timed-out
    function's is kept once cleaned), nothing of ``after`` is left there."""
    rec = await run(client, fn(image, ["sh", "-c", f"echo alive; {LEFT}"]))
    assert rec["status"] == "succeeded", brief(rec)
    if after is not None and after["status"] == "error":
        assert rec["container"] != after["container"], "a failed container was reused"
    if after is not None and rec["container"] == after["container"]:
        # No process of a function's uid but this one, nothing in the temp dirs.
        assert rec["stdout"] == "alive\nufaas\n", brief(rec)
    else:
        assert rec["stdout"].startswith("alive\n"), brief(rec)
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    for pool in (await client.get("/pools")).json():
        assert pool["total"] <= pool["max"] and pool["last_error"] is None, pool
    return rec


# -- bad input ---------------------------------------------------------------------------
#
# One server for the module's bad-input cases, each case a test of its own: every case is
# refused before anything runs, so none can disturb another.


@pytest.fixture(scope="module")
def refusing_server(docker_client, images, tmp_path_factory, module_labels):
    with module_server("bad", tmp_path_factory, module_labels,
                       max_body=MiB, max_file_bytes=64 * 1024, max_total_bytes=256 * 1024,
                       pools=[PoolConfig(image=images.busybox, min_idle=1, max=1)]) as url:
        yield url


@pytest.fixture
async def client(refusing_server):
    """A client of the bad-input server, on one connection: a request after a refused one
    goes on the same connection unless the server closed it."""
    import httpx

    async with httpx.AsyncClient(base_url=refusing_server, timeout=30,
                                 limits=httpx.Limits(max_connections=1)) as client:
        yield client


async def recorded(client):
    r = await client.get("/fn?status=all")
    assert r.status_code == 200, r.text
    return [rec["id"] for rec in r.json()]


async def refused(client, method, path, *, status, **kw):
    """The answer to a request that must be refused with ``status``, recording nothing."""
    before = await recorded(client)
    r = await client.request(method, path, **kw)
    assert r.status_code == status, (method, path[:80], r.text[:300])
    assert r.json()["error"], r.text[:300]
    assert await recorded(client) == before, "a refused request recorded a function"
    return r


def res(**fields):
    """A spec whose one resource has ``fields`` (path ``f`` unless given)."""
    return {"image": "ufaas-test/busybox", "command": ["true"],
            "resources": [{"path": "f", **fields}]}


BAD_PATHS = ["../x", "/etc/x", "a/../../x", "a\x00b", "", "x" * 4096, "a//b", "./a", "a/",
             "\ud800"]


@pytest.mark.parametrize("path", BAD_PATHS, ids=lambda path: ascii(path[:12]))
async def test_bad_path(client, path):
    with trio.fail_after(CAP):
        r = await refused(client, "POST", "/fn", status=422,
                          content=json.dumps(res(path=path, text="x")))
        assert r.json()["error"].startswith("resources.0.path: "), r.json()["error"][:200]


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a/b", "a"], ["a", "a"], ["a/b/c", "a/b"]],
                         ids="+".join)
async def test_conflicting_paths(client, paths):
    with trio.fail_after(CAP):
        body = res(text="x")
        body["resources"] = [{"path": p, "text": "x"} for p in paths]
        r = await refused(client, "POST", "/fn", status=422, json=body)
        assert r.json()["error"].startswith("resources: "), r.text
        assert all(p in r.json()["error"] for p in set(paths)) or "twice" in r.text


# (body, the field the error must name first); each is refused with 422.
BAD_BODIES = [
    (res(base64="!!!!"), "resources.0.base64"),
    (res(base64="AAE"), "resources.0.base64"),
    (res(base64="AA==\n"), "resources.0.base64"),
    (res(base64="\u00e9AA="), "resources.0.base64"),
    (res(text="\ud800"), "resources.0.text"),
    (res(url="http://x/\ud800"), "resources.0.url"),
    (res(text="", mode="0999"), "resources.0.mode"),
    (res(text="", mode=10 ** 400), "resources.0.mode"),
    (res(text="", sha256="z" * 64), "resources.0.sha256"),
    (res(text="a", sha256="0" * 64), "resources.0.sha256"),
    (res(text="", owner="me"), "resources.0.owner"),
    (res(text=5), "resources.0.text"),
    (res(text=None), "resources.0"),
    (res(), "resources.0"),
    (res(text="1", base64="AA=="), "resources.0"),
    ({"image": "ufaas-test/busybox"}, "command"),
    ({"image": "ufaas-test/busybox", "command": ["echo", "\ud800"]}, "command"),
    ({"image": "ufaas-test/busybox", "command": "echo \udfff"}, "command"),
    ({"image": "\ud800", "command": ["true"]}, "image"),
    # The image is optional in the spec (a follow-up inherits one), not for a new function.
    ({"command": ["true"]}, "image"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "stdin": "\ud800"}, "stdin"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "env": {"A": "\ud800"}}, "env.A"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "env": {"\ud800": "1"}}, "env"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "env": {"A": 1}}, "env.A"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "env": ["A=1"]}, "env"),
    ({"image": "ufaas-test/busybox", "command": 5}, "command"),
    ({"image": "ufaas-test/busybox", "command": [1, 2]}, "command"),
    ({"image": "ufaas-test/busybox", "command": []}, "command"),
    ({"image": 5, "command": ["true"]}, "image"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "resources": {}}, "resources"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "resources": [5]}, "resources.0"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "network": "yes"}, "network"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": "5"}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": 0}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": 10 ** 9}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": 1e308}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": -1e308}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "timeout": 10 ** 400}, "timeout"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "surprise": 1}, "surprise"),
    ({"image": "ufaas-test/busybox", "command": ["true"], "\ud800": 1}, "spec: a field name"),
    ([1, 2], "spec"),
    ("text", "spec"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES,
                         ids=[f"{i}-{field.split(':')[0]}" for i, (_, field) in
                              enumerate(BAD_BODIES)])
async def test_bad_body(client, body, field):
    with trio.fail_after(CAP):
        r = await refused(client, "POST", "/fn", status=422, content=json.dumps(body))
        assert r.json()["error"].startswith(field), (field, r.json()["error"][:300])


# Raw bodies that are not valid JSON at all, or that JSON decodes to something out of range.
RAW_BODIES = [
    (b'{"image": "ufaas-test/busybox", "command": ["echo", "\xff"]}', 400),
    (b"\xff\xfe", 400),
    (b'{"image": "ufaas-test/busybox", "command": ["true"], "timeout": 1e400}', 422),
    (b'{"image": "ufaas-test/busybox", "command": ["true"], "timeout": NaN}', 422),
    (b'{"image": "ufaas-test/busybox", "command": ["true"], "timeout": ' + b"9" * 5000 + b"}",
     400),
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (b"", 400),
]


@pytest.mark.parametrize(("raw", "status"), RAW_BODIES,
                         ids=[f"{i}-{status}" for i, (_, status) in enumerate(RAW_BODIES)])
async def test_raw_body(client, raw, status):
    with trio.fail_after(CAP):
        await refused(client, "POST", "/fn", status=status, content=raw)


# Sizes: the body, the number of resources, one file, all files together.


async def test_body_too_large(client, images):
    with trio.fail_after(CAP):
        await refused(client, "POST", "/fn", status=413,
                      json=fn(images.busybox, ["true"], stdin="x" * MiB))


async def test_too_many_resources(client, images):
    with trio.fail_after(CAP):
        many = fn(images.busybox, ["true"],
                  resources=[{"path": f"f{i}", "text": ""} for i in range(10_000)])
        r = await refused(client, "POST", "/fn", status=422, json=many)
        assert r.json()["error"] == "resources: 10000 resources: at most 256 are allowed"


@pytest.mark.parametrize(("fields", "field"), [
    ({"text": "x" * (64 * 1024 + 1)}, "resources.0.text"),
    ({"base64": "AAAA" * (64 * 1024 // 3 + 1)}, "resources.0.base64"),
], ids=["text", "base64"])
async def test_file_too_large(client, fields, field):
    with trio.fail_after(CAP):
        r = await refused(client, "POST", "/fn", status=422, json=res(**fields))
        assert r.json()["error"].startswith(field), r.text[:300]


async def test_files_too_large_together(client, images):
    with trio.fail_after(CAP):
        five = fn(images.busybox, ["true"],
                  resources=[{"path": f"f{i}", "text": "x" * 60_000} for i in range(5)])
        r = await refused(client, "POST", "/fn", status=422, json=five)
        assert "bytes of embedded content" in r.json()["error"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/fn/x?strict=maybe", 400), ("POST", "/nowhere", 404), ("PATCH", "/fn", 405),
    ("GET", "/pools", 200)])
async def test_unread_body_does_not_stall_the_connection(client, method, path, status):
    """A body the server answers without reading must not stall the next request on the
    same connection: the server closes it instead."""
    with trio.fail_after(CAP):
        r = await client.request(method, path, content=b"x" * 500_000)
        assert r.status_code == status, r.text
        assert r.headers["connection"] == "close"
        if status == 200:
            assert isinstance(r.json(), list)
        else:
            assert r.json()["error"]
        r = await client.get("/fn")
        assert r.status_code == 200 and r.json() == [], r.text


# Query strings: huge and odd numbers are refused, naming the parameter.
@pytest.mark.parametrize("query", [
    "limit=1e30", f"limit={10 ** 30}", "limit=0", "limit=-1", "limit=nan", "wait=1e308",
    "wait=inf", "wait=-1", f"wait={10 ** 400}"], ids=lambda query: query[:16])
async def test_bad_query(client, query):
    with trio.fail_after(CAP):
        path = "/fn" if query.startswith("limit") else f"/fn/{uuid.uuid4()}"
        r = await refused(client, "GET", f"{path}?{query}", status=400)
        assert repr(query.split("=")[0]) in r.json()["error"]


@pytest.mark.parametrize("query", ["wait=abc", "wait=1e308"])
async def test_refused_query_queues_nothing(client, images, query):
    with trio.fail_after(CAP):
        await refused(client, "POST", f"/fn?{query}", status=400, json=fn(images.busybox, ["true"]))


async def test_refused_input_leaves_nothing_behind(client, images):
    """Run after the cases above (pytest keeps the order of a module): nothing any of them
    sent was written, and the server serves."""
    with trio.fail_after(CAP):
        rec = await run(client, fn(images.busybox, "for p in /x /etc/x /tmp/x /tmp/ufaas/x; "
                                   "do test -e $p && echo found $p; done; echo clean"))
        assert rec["stdout"] == "clean\n", brief(rec)
        # An explicit null is the same as a field not given.
        rec = await run(client, res(text="x", base64=None, url=None, sha256=None))
        assert rec["status"] == "succeeded", brief(rec)
        await still_serves(client, images.busybox)


# -- URL resources -----------------------------------------------------------------------


@pytest.fixture
def site(make_site):
    return make_site({
        "/file": sites.send(b"content\n"),
        "/big": sites.send(b"x" * 4097),
        "/big-unsized": sites.unsized(100 * 1024),
        "/drip": sites.drip(3.0),  # a byte every 3 s: longer than the whole deadline
        "/to-file": sites.redirect("file:///etc/passwd"),
    })


async def test_url_resources(start_server, make_config, images, site):
    """Schemes are refused at once (422); what only the download shows ends the function
    as ``error`` with a message naming the URL and the problem."""
    config = make_config(download_max_bytes=4096, download_timeout=2,
                         fetch_allow=["127.0.0.1/32"],
                         pools=[PoolConfig(image=images.busybox, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x",
                    "http://", "http:///x", "data:text/plain,x"):
            r = await client.post("/fn", json=res(url=url))
            assert r.status_code == 422, (url, r.text)
            assert r.json()["error"].startswith("resources.0.url: "), r.text
        assert await recorded(client) == []
        cases = {
            "/big": "larger than the limit of 4096 bytes",
            "/big-unsized": "larger than the limit of 4096 bytes",
            "/drip": "no complete response within 2 s",
            "/to-file": "file:///etc/passwd",
            "/missing": "HTTP 404",
        }
        ids = {}
        for path in cases:
            r = await client.post("/fn", json=res(url=site.url + path))
            assert r.status_code == 202, r.text
            ids[path] = r.json()["id"]
        r = await client.post("/fn", json=res(url=site.url + "/file", sha256="0" * 64))
        ids["/file"] = r.json()["id"]
        cases["/file"] = "sha256 is "
        for path, fid in ids.items():
            rec = (await client.get(f"/fn/{fid}?wait=20")).json()
            assert rec["status"] == "error", (path, brief(rec))
            assert rec["error"].startswith(site.url + path), (path, rec["error"])
            assert cases[path] in rec["error"], (path, rec["error"])
            assert path != "/to-file" or "redirect" in rec["error"].lower()
            assert rec["started_at"] is None  # nothing ran
        rec = await run(client, fn(images.busybox, ["cat", "f"],
                                   resources=[{"path": "f", "url": site.url + "/file"}]))
        assert rec["stdout"] == "content\n", brief(rec)
        await still_serves(client, images.busybox)


# -- runaway code ------------------------------------------------------------------------


@pytest.fixture(params=["python", "busybox"])
def image(request, images):
    """Each runaway case runs through the agent (python) and through plain exec (busybox)."""
    return getattr(images, request.param)


async def test_fork_bomb(start_server, make_config, image):
    config = make_config(pools=[PoolConfig(image=image, min_idle=1, max=1, pids=64)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = await run(client, fn(image, "bomb() { bomb | bomb & }; bomb; sleep 100",
                                   timeout=2))
        assert rec["status"] in ("timeout", "failed"), brief(rec)
        await still_serves(client, image, after=rec)


async def test_memory_bomb(start_server, make_config, image, images):
    config = make_config(pools=[PoolConfig(image=image, min_idle=1, max=1, memory=96 * MiB)])
    # Both run paths say when the kernel killed for memory (busybox dd fills a 200 MB
    # buffer against the 96 MiB limit).
    bomb = (["python3", "-c", "x = []\nwhile True: x.append(b'x' * (8 << 20))"]
            if image == images.python
            else ["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = await run(client, fn(image, bomb))
        assert rec["status"] == "failed" and rec["oom"] is True, brief(rec)
        assert rec["signal"] == 9 and "out of memory" in rec["error"], brief(rec)
        calm = await still_serves(client, image, after=rec)
        assert calm["oom"] is False and calm["error"] is None, brief(calm)


async def test_output_flood(start_server, make_config, image):
    cap = 64 * 1024
    config = make_config(output_cap=cap,
                         pools=[PoolConfig(image=image, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = await run(client, fn(image, "yes | head -c 3000000; yes | head -c 3000000 >&2"))
        assert rec["status"] == "succeeded", brief(rec)
        assert len(rec["stdout"]) == cap and len(rec["stderr"]) == cap
        assert rec["truncated"] is True
        rec = await run(client, fn(image, "yes & yes >&2", timeout=2))
        assert rec["status"] == "timeout", brief(rec)
        assert len(rec["stdout"]) == cap and len(rec["stderr"]) == cap
        assert rec["truncated"] is True
        await still_serves(client, image, after=rec)


async def test_sigterm_ignored(start_server, make_config, image, docker_client):
    config = make_config(pools=[PoolConfig(image=image, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = await run(client, fn(image, 'trap "" TERM; sleep 100; echo slept', timeout=1))
        # Ended at its deadline, not by its sleep (through the agent, a run not ended at
        # its deadline is cancelled or an error once the runner's own grace is over).
        assert rec["status"] == "timeout" and rec["error"] is None, brief(rec)
        assert "slept" not in rec["stdout"], brief(rec)
        # Killed at its deadline, whatever it traps, and cleaned up: its container serves
        # the next function, with nothing of it left.
        after = await still_serves(client, image, after=rec)
        assert after["container"] == rec["container"], brief(after)


async def test_background_processes_do_not_survive(start_server, make_config, image, images):
    config = make_config(pools=[PoolConfig(image=image, min_idle=1, max=1)])
    if image == images.python:
        escape = ("setsid sleep 301 & nohup sleep 302 >/dev/null 2>&1 & (sleep 303 &); "
                  "sh -c 'sleep 304 &'; python3 -c 'import os, time\n"
                  "if os.fork() == 0:\n os.setsid()\n if os.fork() == 0: time.sleep(305)\n'; "
                  "echo started")
    else:
        escape = "sleep 301 & (sleep 303 &); sh -c 'sleep 304 &'; echo started"
    look = "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"
    with trio.fail_after(CAP):
        client = await start_server(config)
        first = await run(client, fn(image, escape))
        assert first["status"] == "succeeded" and first["stdout"] == "started\n", brief(first)
        second = await run(client, fn(image, look))
        assert second["container"] == first["container"]
        assert "sleep 30" not in second["stdout"], second["stdout"]


async def test_disk_full(start_server, make_config, image):
    size = 32 * MiB
    config = make_config(pools=[PoolConfig(image=image, min_idle=1, max=1, workdir_size=size,
                                           memory=256 * MiB)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = await run(client, fn(image, "dd if=/dev/zero of=big bs=1M count=100000; rc=$?; "
                                   "stat -c %s big; grep ' /tmp/ufaas ' /proc/mounts; exit $rc"))
        assert rec["status"] == "failed", brief(rec)
        assert "No space left on device" in rec["stderr"]
        written, mount = rec["stdout"].splitlines()
        assert int(written) <= size and mount.split()[2] == "tmpfs"
        blob = "x" * MiB
        after = await run(client, fn(image, "cat blob | wc -c",
                                     resources=[{"path": "blob", "text": blob}]))
        assert after["status"] == "succeeded" and after["stdout"].strip() == str(MiB), brief(after)
        # A disk left full is not handed to the next function: the container was replaced.
        assert after["container"] != rec["container"]
        await still_serves(client, image)


# -- exposure ----------------------------------------------------------------------------


# The only routes anyone may call: the browser pages' static files (ufaas.api.PUBLIC).
PUBLIC = {"/": "dashboard", "/docs": "docs", "/ui/dashboard.js": "asset"}


def routes(config):
    """Every route of the app but the public ones as (method, path, websocket), ``<fid>``
    filled in: a route added later is checked without this test changing."""
    from ufaas.api import PUBLIC as public_endpoints
    from ufaas.server import Service

    service = Service.build(config.model_copy(update={"db": ":memory:"}))
    service.store.close()
    service.files.close()
    app = service.app
    assert public_endpoints == set(PUBLIC.values())
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in public_endpoints:
            continue
        path = rule.rule.replace("<fid>", str(uuid.uuid4())).replace("<path:path>", "a.txt")
        assert "<" not in path, f"fill in the argument of {rule.rule} in this test"
        if rule.websocket:
            found.append(("GET", path, True))
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((method, path, False))
    return found


async def test_token_everywhere_and_never_logged(start_server, make_config, images, tmp_path,
                                                 caplog):
    import httpx
    from trio_websocket import ConnectionRejected, open_websocket_url

    secret = f"tok-{uuid.uuid4().hex}"
    config = make_config(token=secret, pools=[PoolConfig(image=images.busybox, min_idle=1,
                                                         max=1)])
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(CAP):
        client = await start_server(config, token=secret)
        every = routes(config)
        assert ("POST", "/fn", False) in every and any(ws for _, _, ws in every)
        base = str(client.base_url)
        wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {secret}"},
                 {"Authorization": f"Bearer {secret}x"}, {"Authorization": secret},
                 {"X-Token": secret}]
        async with httpx.AsyncClient(base_url=base, timeout=30) as anonymous:
            for method, path, ws in every:
                # Piston's clients send their key alone: its routes take it that way too.
                piston = path.startswith("/api/v2/")
                for headers in [h for h in wrong if not piston or h != {"Authorization": secret}]:
                    if ws:
                        with pytest.raises(ConnectionRejected) as rejected:
                            async with open_websocket_url(
                                    base.replace("http", "ws", 1) + path,
                                    extra_headers=list(headers.items())):
                                pass
                        assert rejected.value.status_code == 401, (path, headers)
                        continue
                    # With a body, so an unread body on a refused request is covered too.
                    r = await anonymous.request(method, path, headers=headers,
                                                content=b"{}" * 50_000)
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert r.json()["message" if piston else "error"] == "missing or wrong token"
                # The first token counts, as everywhere else in query strings. A valid spec
                # as the body: a refusal must not depend on the body being wrong.
                valid = json.dumps({"image": images.busybox, "command": ["true"]}).encode()
                for query in ("token=", "token=nope", f"token={secret}x",
                              f"token=nope&token={secret}"):
                    r = await anonymous.request(method, f"{path}?{query}", content=valid)
                    assert r.status_code == 401, (method, path, query)
            # The static files of the browser pages need none: they hold no data.
            for path in PUBLIC:
                r = await anonymous.get(path)
                assert r.status_code == 200 and secret not in r.text, path
            # The token works as a query parameter too (for WebSocket clients).
            assert (await anonymous.get(f"/fn?token={secret}")).status_code == 200
            # The scheme is case-insensitive (RFC 9110).
            lower = {"Authorization": f"bearer {secret}"}
            assert (await anonymous.get("/fn", headers=lower)).status_code == 200
        # With the token, every endpoint answers (a function id that does not exist: 404).
        for method, path, ws in every:
            if ws:
                # The token as a query parameter, and as the header, as for HTTP.
                url = base.replace("http", "ws", 1) + path
                async with open_websocket_url(f"{url}?token={secret}"):
                    pass
                async with open_websocket_url(
                        url, extra_headers=[("Authorization", f"Bearer {secret}")]):
                    pass
            else:
                r = await client.request(method, path, json={"command": ["true"]})
                assert r.status_code != 401, (method, path, r.text)
        rec = await run(client, fn(images.busybox, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
        assert rec["status"] == "failed"
        assert (await client.post("/fn", json={"image": images.busybox})).status_code == 422
        await still_serves(client, images.busybox)
    server_side = [r for r in caplog.records
                   if not r.name.startswith(("httpx", "httpcore", "trio-websocket"))]
    assert any("ufaas ready" in r.getMessage() for r in server_side)
    for record in server_side:
        assert secret not in record.getMessage() and secret not in (record.exc_text or ""), \
            record.name


# -- hardening ---------------------------------------------------------------------------


async def test_every_container_is_hardened(start_server, make_config, images, docker_client,
                                           test_id):
    secret = f"tok-{uuid.uuid4().hex}"
    config = make_config(token=secret, pools=[
        PoolConfig(image=images.python, min_idle=2, max=2, pids=100, memory=200 * MiB),
        PoolConfig(image=images.busybox, min_idle=1, max=1, network=True,
                   workdir_size=8 * MiB),
    ])
    with trio.fail_after(CAP):
        client = await start_server(config, token=secret)
        # One function on an on-demand pool too: it gets the default profile.
        await run(client, fn(images.busybox, ["true"]))
        while sum(p["warm"] for p in (await client.get("/pools")).json()) < 4:
            await trio.sleep(0.1)
        pools = (await client.get("/pools")).json()
        profiles = {p["name"]: p["profile"] for p in pools}
        modes = {p["name"]: p["mode"] for p in pools}
        assert len(profiles) == 3
        found = await trio.to_thread.run_sync(lambda: docker_client.containers.list(
            all=True, filters={"label": f"ufaas.test={test_id}"}))
        assert len(found) >= 4
        networked = set()
        for container in found:
            attrs = container.attrs
            host, conf = attrs["HostConfig"], attrs["Config"]
            name = conf["Labels"]["ufaas.pool"]
            profile = profiles[name]
            # The main process (the agent, or exec mode's lifeline) is root with no more
            # than the agent needs to run functions as the profile's user; those have none.
            caps = sorted(c.removeprefix("CAP_") for c in host.get("CapAdd") or [])
            assert host["CapDrop"] == ["ALL"], name
            assert caps == (["KILL", "SETGID", "SETUID"] if modes[name] == "agent" else []), \
                (name, caps)
            assert conf["User"] == "0:0" and profile["user"] == "65534:65534", name
            assert "no-new-privileges" in host["SecurityOpt"], name
            assert not host["Privileged"], name
            assert host["PidsLimit"] == profile["pids"], name
            assert host["Memory"] == host["MemorySwap"] == profile["memory"], name
            # Nothing written reaches the host's disk: a read-only root, capped tmpfs.
            assert host["ReadonlyRootfs"] is True, name
            assert set(host["Tmpfs"]) == {"/tmp", "/var/tmp", "/run", "/tmp/ufaas"}, name
            assert f"size={profile['workdir_size']}," in host["Tmpfs"]["/tmp/ufaas"], name
            assert "mode=1733" in host["Tmpfs"]["/tmp/ufaas"], name
            for temp in ("/tmp", "/var/tmp"):
                assert f"size={profile['tmp_size']}," in host["Tmpfs"][temp], name
            assert host["ShmSize"] == profile["tmp_size"], name
            assert host["LogConfig"]["Type"] == "none", name
            # The dead-man's switch: stdin held by the server, removed once it stops.
            assert conf["OpenStdin"] and conf["StdinOnce"] and host["AutoRemove"], name
            assert not host.get("Binds") and not attrs["Mounts"], (name, attrs["Mounts"])
            assert "docker.sock" not in json.dumps(attrs), name
            assert not any(secret in e for e in conf["Env"] or []), name
            if profile["network"]:
                networked.add(name)
                assert host["NetworkMode"] not in ("none", "host"), name
            else:
                assert host["NetworkMode"] == "none" and conf.get("NetworkDisabled"), name
        assert len(networked) == 1


# -- fuzz --------------------------------------------------------------------------------


ODD = [None, True, False, 0, -1, 1.5, 10 ** 400, 1e308, -1e308, float("inf"), float("nan"),
       "", " ", "\x00", "\ud800", "\udfff", "é", "a" * 5000, [], {}, [None], {"": None},
       "../x", "/etc/x", "a/../../x", "0777", "0o644", "file:///etc/passwd", "ftp://x/y",
       "http://", "http://127.0.0.1:9/x", "0" * 64, "AAEC", "!!", "A:B:C", "x@sha256:zz",
       "ufaas-test/nonexistent", "UPPER", "-x"]


def fuzz_strategies(image):
    from hypothesis import strategies as st

    odd = st.sampled_from(ODD)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(
        scalars | odd,
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | odd.filter(lambda v: isinstance(v, str)),
                          inner, max_size=4),
        max_leaves=12)
    texts = st.text(max_size=30) | odd
    resource = st.fixed_dictionaries({}, optional={
        "path": st.sampled_from(["a", "a/b", "run.sh"]) | texts,
        "text": texts, "base64": texts, "url": texts, "sha256": texts,
        "mode": st.sampled_from(["0755", 420, 511, 512, "8"]) | values,
        "extra": values,
    })
    spec = st.fixed_dictionaries({}, optional={
        # Valid specs all use one image whose pools are kept busy: nothing random runs.
        "image": st.just(image) | odd,
        "command": st.lists(texts, max_size=3) | texts | values,
        "resources": st.lists(resource | values, max_size=3) | values,
        "env": st.dictionaries(texts.filter(lambda v: isinstance(v, str)), texts,
                               max_size=3) | values,
        "stdin": texts,
        "timeout": st.floats() | st.integers() | texts,
        "network": st.booleans() | values,
        "surprise": values,
    })
    params = st.dictionaries(
        st.sampled_from(["wait", "limit", "status", "strict", "container", "purge", "token"])
        | st.text(max_size=5),
        st.text(max_size=12) | odd.map(str), max_size=3)
    return st, values, spec, params


def raw_quote(text):
    """Percent-encoded UTF-8, lone surrogates included (so invalid UTF-8 on the wire)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def test_fuzz(make_config, images, test_id, test_labels):
    """Arbitrary JSON and odd specs to every endpoint: never a 5xx, and the server serves."""
    import httpx
    from hypothesis import HealthCheck, given, settings

    image = images.busybox
    config = make_config(max_wait=0.05, min_idle=0, shutdown_grace=0, pools=[
        PoolConfig(image=image, min_idle=1, max=1),
        PoolConfig(image=image, min_idle=0, max=1, network=True)])
    st, values, spec, params = fuzz_strategies(image)
    odd_texts = st.sampled_from([v for v in ODD if isinstance(v, str)])
    with ThreadedServer(config, instance=f"{test_id}-fuzz", labels=test_labels) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        blockers = [client.post("/fn", json=fn(image, ["sleep", "300"], network=network,
                                               timeout=300))
                    for network in (False, True)]
        pending = client.post("/fn", json=fn(image, ["true"])).json()["id"]
        for blocker in blockers:
            bid = blocker.json()["id"]
            while client.get(f"/fn/{bid}").json()["status"] != "running":
                time.sleep(0.05)
        assert client.get(f"/fn/{pending}").json()["status"] == "pending"

        def check(r):
            assert r.status_code < 500, (r.request.method, r.request.url, r.text[:300])
            if r.status_code >= 400:
                assert r.json()["error"], r.text[:300]

        def query(params):
            return "&".join(f"{raw_quote(k)}={raw_quote(v)}" for k, v in params.items())

        def body(value):
            return json.dumps(value).encode()  # NaN, Infinity and lone surrogates included

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def fuzz(data):
            payload = data.draw(values | spec, label="body")
            check(client.post("/fn", content=body(payload)))
            check(client.put(f"/fn/{pending}", content=body(data.draw(values | spec))))
            check(client.post(f"/fn/{pending}?{query(data.draw(params))}",
                              content=body(data.draw(spec))))
            path = data.draw(st.sampled_from(
                ["/fn", f"/fn/{pending}", f"/fn/{uuid.uuid4()}", "/pools", "/watchers"])
                | (st.text(max_size=10) | odd_texts).map(lambda t: "/fn/" + raw_quote(t)))
            check(client.get(f"{path}?{query(data.draw(params))}"))
            check(client.delete(f"/fn/{uuid.uuid4()}?{query(data.draw(params))}"))

        fuzz()
        assert client.get("/healthz").json() == {"status": "ok"}
        # Still queued, unless a valid PUT moved it to an image that does not exist.
        after = client.get(f"/fn/{pending}").json()
        assert after["status"] == "pending" or (
            after["status"] == "error" and after["spec"]["image"] != image
            and "not available" in after["error"]), after
        for r in client.get("/fn?status=all&limit=1000").json():
            assert r["status"] in ("pending", "running", "error", "cancelled"), r
