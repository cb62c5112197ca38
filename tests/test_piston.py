"""The Piston-compatible API (/api/v2) against the real server: its contract, both test
runtimes (python through the agent, sh through plain exec), compile stages, every status,
the WebSocket protocol, and a real Piston client library (piston_rspy) unchanged."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
import trio
from command import module_server
from trio_websocket import ConnectionClosed, open_websocket_url

from ufaas.config import DEFAULT_RUNTIMES, PoolConfig, RuntimeConfig

CAP = 60
MiB = 1 << 20
# A "compiler" for the compile stage: it refuses a file that says FAIL, else joins the
# files into an executable.
COMPILE = ["sh", "-c", 'for f; do case "$(cat "$f")" in *FAIL*) echo "error in $f" >&2; '
           'exit 1;; esac; done; cat "$@" > prog && chmod 755 prog', "sh", "{files}"]


def runtimes(images):
    return [*DEFAULT_RUNTIMES,
            RuntimeConfig(language="shc", version="1.0.0", aliases=["compiled-sh"],
                          image=images.python, compile=COMPILE, run=["./prog"]),
            RuntimeConfig(language="bbc", version="1.0.0", image=images.busybox,
                          compile=COMPILE, run=["./prog"]),
            RuntimeConfig(language="python", version="3.12.0", runtime="cpython",
                          image="ufaas-test/missing", run=["python3", "{file}"]),
            RuntimeConfig(language="ghost", version="1.0.0", image="ufaas-test/missing",
                          run=["true"])]


@pytest.fixture(scope="module")
def server(docker_client, images, tmp_path_factory, module_labels):
    with module_server("piston", tmp_path_factory, module_labels,
                       pools=[PoolConfig(image=images.python, min_idle=1, max=2),
                              PoolConfig(image=images.busybox, min_idle=1, max=1)],
                       runtimes=runtimes(images)) as url:
        yield url


@pytest.fixture
async def client(server):
    async with httpx.AsyncClient(base_url=server, timeout=CAP) as c:
        yield c


async def execute(client, language, files, **kw):
    if isinstance(files, str):
        files = [{"name": "main", "content": files}]
    # Any version, but python's 3.12 (its image is missing: XX) unless asked for.
    kw.setdefault("version", "3.11.x" if language == "python" else "*")
    r = await client.post("/api/v2/execute", json={"language": language, "files": files, **kw})
    assert r.status_code == 200, r.text
    return r.json()


async def refused(client, body, status=400):
    r = await client.post("/api/v2/execute", json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["message"], r.text
    return r.json()["message"]


async def test_runtimes(client):
    r = await client.get("/api/v2/runtimes")
    assert r.status_code == 200
    shown = r.json()
    assert shown[:2] == [
        {"language": "python", "version": "3.11.2", "aliases": ["py", "py3", "python3"]},
        {"language": "sh", "version": "1.35.0", "aliases": ["shell", "busybox"]}]
    assert {"language": "python", "version": "3.12.0", "aliases": [],
            "runtime": "cpython"} in shown


async def test_python_runs_forked_with_args_stdin_and_measures(client):
    # Each write given time to be read before the next: "output" keeps the order it read.
    code = ("import sys, time\nprint('args', sys.argv, flush=True)\ntime.sleep(0.2)\n"
            "print('to stderr', file=sys.stderr, flush=True)\ntime.sleep(0.2)\n"
            "print(repr(sys.stdin.read()))\n")
    with trio.fail_after(CAP):
        got = await execute(client, "py", code, version="3.x", args=["a", "b c"], stdin="in")
        records = (await client.get("/fn?status=all&limit=1")).json()
    assert (got["language"], got["version"]) == ("python", "3.11.2")
    run = got["run"]
    assert run["stdout"] == "args ['main', 'a', 'b c']\n'in\\n'\n"  # stdin gets its newline
    assert run["stderr"] == "to stderr\n"
    assert run["output"] == "args ['main', 'a', 'b c']\nto stderr\n'in\\n'\n"
    assert (run["code"], run["signal"], run["status"], run["message"]) == (0, None, None, None)
    assert run["cpu_time"] > 0 and run["wall_time"] > 0 and \
        run["memory"] > MiB
    assert "compile" not in got
    # It took the warm-Python path, as a function on the usual one.
    assert records[0]["forked"] is True
    assert records[0]["spec"]["command"] == ["python3", "main", "a", "b c"]


async def test_one_connection_serves_many_executes(server):
    """Piston clients reuse their connection: an answer must not close it."""
    async with httpx.AsyncClient(base_url=server, timeout=CAP) as c:
        answers = [await c.post("/api/v2/execute", json={
            "language": "sh", "version": "*", "files": [{"content": "echo hi"}]})
            for _ in range(3)]
        pool = c._transport._pool  # httpx's connection pool: one connection, kept open
        connections = list(pool.connections)
    assert all(a.status_code == 200 and a.json()["run"]["stdout"] == "hi\n" for a in answers)
    assert all(a.headers.get("connection") != "close" for a in answers)
    assert len(connections) == 1


async def test_sh_through_plain_exec(client):
    with trio.fail_after(CAP):
        got = await execute(client, "shell", [{"content": 'echo "$0" "$@"; read x; echo "$x"'}],
                            args=["1", "2"], stdin="typed")
        failed = await execute(client, "sh", "echo no >&2; exit 3")
    assert got["run"]["stdout"] == "file0.code 1 2\ntyped\n" and got["run"]["code"] == 0
    assert (failed["run"]["code"], failed["run"]["status"], failed["run"]["message"]) == (
        3, "RE", "Exited with error status 3")
    assert failed["run"]["stderr"] == failed["run"]["output"] == "no\n"


@pytest.mark.parametrize(("case", "language", "code", "kw", "status", "signal"), [
    ("runtime error", "python", "raise SystemExit(4)", {}, "RE", None),
    ("a signal", "python", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", {},
     "SG", "SIGSEGV"),
    ("wall clock", "python", "import time\ntime.sleep(20)", {"run_timeout": 500}, "TO",
     "SIGKILL"),
    ("CPU time", "python", "while True:\n    pass", {"run_cpu_time": 1000}, "TO", "SIGKILL"),
    ("CPU time, plain exec", "sh", "while :; do :; done", {"run_cpu_time": 1000}, "TO",
     "SIGKILL"),
    ("stdout limit", "python", "import sys\nsys.stdout.write('x' * (3 << 20))", {}, "OL", None),
    ("stderr limit", "python", "import sys\nsys.stderr.write('x' * (3 << 20))", {}, "EL", None),
    ("internal error", "ghost", "x", {}, "XX", None),
    ("memory limit", "python", "b = bytearray(300 << 20)", {"run_memory_limit": 128 * MiB},
     "RE", None),
])
async def test_statuses(client, case, language, code, kw, status, signal):
    with trio.fail_after(CAP):
        run = (await execute(client, language, code, **kw))["run"]
    assert (run["status"], run["signal"]) == (status, signal), run
    assert run["message"], run
    if status == "TO":
        assert run["code"] is None
    if case == "memory limit":
        assert "MemoryError" in run["stderr"]
    if case == "CPU time":
        assert run["cpu_time"] >= 900 and run["wall_time"] < 20_000


async def test_encodings(client):
    data = bytes(range(256))
    files = [{"name": "main.py", "content": "import sys\nfor n in sys.argv[1:]:\n"
              "    print(n, open(n, 'rb').read() == bytes(range(256)))\n"},
             {"name": "b.bin", "content": base64.b64encode(data).decode(), "encoding": "base64"},
             {"name": "h.bin", "content": data.hex(), "encoding": "hex"},
             {"name": "sub/u.txt", "content": "plain", "encoding": "nonsense"}]
    with trio.fail_after(CAP):
        run = (await execute(client, "python", files, args=["b.bin", "h.bin"]))["run"]
        assert run["stdout"] == "b.bin True\nh.bin True\n", run
        # The first utf8 file is the one run: an unknown encoding reads as utf8.
        run = (await execute(client, "python", files[1:3] + [
            {"name": "m.py", "content": "print(open('sub/u.txt').read() if False else 1)"}]))
        assert run["run"]["stdout"] == "1\n"
        assert await refused(client, {"language": "python", "version": "3.11.x", "files": [
            {"content": "%%%", "encoding": "base64"}, {"content": "print(1)"}]}) == \
            "files[0].content is not valid base64"
        assert await refused(client, {"language": "python", "version": "3.11.x", "files": [
            {"content": "AAAA", "encoding": "base64"}]}) == \
            "files must include at least one utf8 encoded file"


@pytest.mark.parametrize("language", ["shc", "bbc"])
async def test_compile_then_run(client, language):
    files = [{"name": "a.sh", "content": "#!/bin/sh\necho compiled run \"$@\"\n"},
             {"name": "b.sh", "content": "echo second file\n"}]
    with trio.fail_after(CAP):
        got = await execute(client, language, files, args=["x"])
        failed = await execute(client, language, files + [{"name": "c.sh", "content": "FAIL"}])
    assert got["compile"]["code"] == 0 and got["compile"]["status"] is None
    assert got["run"]["stdout"] == "compiled run x\nsecond file\n", got
    # A failed compile is the answer's run too, as Piston answers it.
    assert failed["compile"]["code"] == 1 and failed["compile"]["status"] == "RE"
    assert failed["compile"]["stderr"] == "error in c.sh\n"
    assert failed["run"] == failed["compile"]


async def test_requests_refused_as_piston_refuses_them(client):
    base = {"language": "python", "version": "3.11.x", "files": [{"content": "print(1)"}]}
    cases = [
        ({}, "language is required as a string"),
        ({"language": "python"}, "version is required as a string"),
        ({"language": "python", "version": "3"}, "files is required as an array"),
        ({**base, "files": [{"name": "x"}]}, "files[0].content is required as a string"),
        ({**base, "language": "cobol"}, "cobol-3.11.x runtime is unknown"),
        ({**base, "version": "2.x"}, "python-2.x runtime is unknown"),
        ({**base, "version": "not a range"}, "python-not a range runtime is unknown"),
        # The newest runtime that matches, even when its image is not there.
        ({**base, "version": "3.12", "files": [{"content": "00", "encoding": "hex"}]},
         "files must include at least one utf8 encoded file"),
        ({**base, "run_timeout": "fast"}, "If specified, run_timeout must be a number"),
        ({**base, "run_timeout": 60_000}, "run_timeout cannot exceed the configured limit of 3000"),
        # What JavaScript takes as true is a value: [] and {} are no numbers, nor names.
        ({**base, "run_timeout": []}, "If specified, run_timeout must be a number"),
        ({**base, "run_cpu_time": {}}, "If specified, run_cpu_time must be a number"),
        ({**base, "files": [{"name": ["a"], "content": "1"}]}, "files[0].name must be a string"),
        ({**base, "compile_cpu_time": -5}, "compile_cpu_time must be non-negative"),
        ({**base, "run_memory_limit": 1 << 40},
         "run_memory_limit cannot exceed the configured limit of 536870912"),
        ({**base, "args": [1]}, "args must be an array of strings"),
        ({**base, "files": [{"name": "../x", "content": "1"}]}, None),
    ]
    with trio.fail_after(CAP):
        for body, message in cases:
            got = await refused(client, body)
            assert message is None or got == message, (body, got)
        assert "'..'" in await refused(client, cases[-1][0])
        r = await client.post("/api/v2/execute", content=b"language=python")
        assert (r.status_code, r.json()) == (415, {
            "message": "requests must be of type application/json"})
        r = await client.post("/api/v2/execute", content=b"{nope",
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["message"]
        # What it takes as false is "not given", as in Piston: the default.
        got = await execute(client, "python", [{"name": False, "content": "print(3)"}],
                            run_timeout=False, run_cpu_time="",
                            compile_memory_limit=0)
        assert got["run"]["stdout"] == "3\n"
        # -1 is Piston's "no memory limit"; the newest matching version is chosen.
        got = await execute(client, "python", "print(2)", run_memory_limit=-1, version="3.11")
        assert got["run"]["stdout"] == "2\n" and got["version"] == "3.11.2"


# -- the WebSocket -------------------------------------------------------------------------


def ws_url(server):
    return server.replace("http://", "ws://", 1) + "/api/v2/connect"


async def messages_until_close(ws):
    got = []
    try:
        while True:
            got.append(json.loads(await ws.get_message()))
    except ConnectionClosed as closed:
        return got, closed.reason.code, closed.reason.reason


async def test_connect_streams_stages_and_takes_stdin(server):
    files = [{"name": "a.sh", "content": "echo asks; read x; echo \"got $x\"; read y; "
                                          "echo never"}]
    with trio.fail_after(CAP):
        async with open_websocket_url(ws_url(server)) as ws:
            await ws.send_message(json.dumps({"type": "init", "language": "shc",
                                              "version": "1.x", "files": files}))
            head = [json.loads(await ws.get_message()) for _ in range(4)]
            assert head == [{"type": "runtime", "language": "shc", "version": "1.0.0"},
                            {"type": "stage", "stage": "compile"},
                            {"type": "exit", "stage": "compile", "code": 0, "signal": None},
                            {"type": "stage", "stage": "run"}]
            assert json.loads(await ws.get_message()) == {
                "type": "data", "stream": "stdout", "data": "asks\n"}
            await ws.send_message(json.dumps({"type": "data", "stream": "stdin",
                                              "data": "hello\n"}))
            assert json.loads(await ws.get_message()) == {
                "type": "data", "stream": "stdout", "data": "got hello\n"}
            await ws.send_message(json.dumps({"type": "signal", "signal": "SIGTERM"}))
            rest, code, reason = await messages_until_close(ws)
    assert rest == [{"type": "exit", "stage": "run", "code": None, "signal": "SIGKILL"}]
    assert (code, reason) == (4999, "Job Completed")


@pytest.mark.parametrize(("messages", "code", "reason"), [
    ([], 4001, "Initialization Timeout"),
    ([{"type": "data", "stream": "stdin", "data": "x"}], 4003, "Not yet initialized"),
    (["init", {"type": "init"}], 4000, "Already Initialized"),
    (["init", {"type": "data", "stream": "stdout", "data": "x"}], 4004,
     "Can only write to stdin"),
    (["init", {"type": "signal", "signal": "SIGNOPE"}], 4005, "Invalid signal"),
    ([{"type": "init", "language": "cobol", "version": "*", "files": []}], 4002,
     "Notified Error"),
    (["init", "not json"], 4002, "Notified Error"),
])
async def test_connect_protocol_errors(server, messages, code, reason):
    init = {"type": "init", "language": "python", "version": "*",
            "files": [{"content": "import time\ntime.sleep(30)"}]}
    with trio.fail_after(CAP):
        async with open_websocket_url(ws_url(server)) as ws:
            for m in messages:
                text = m if isinstance(m, str) and m != "init" else json.dumps(
                    init if m == "init" else m)
                await ws.send_message(text)
            got, closed_code, closed_reason = await messages_until_close(ws)
    assert (closed_code, closed_reason) == (code, reason)
    if code == 4002:
        assert got[-1]["type"] == "error" and got[-1]["message"]


# -- clients -------------------------------------------------------------------------------


def piston_rspy_execute(url, key=None):
    """A real Piston client (piston_rspy, from the package index), unchanged: only its base
    URL (and key) set."""
    import piston_rspy

    async def main():
        client = (piston_rspy.Client.with_url_and_key(url, key) if key
                  else piston_rspy.Client.with_url(url))
        names = {rt.language for rt in await client.fetch_runtimes()}
        executor = (piston_rspy.Executor().set_language("python").set_version("3.11.2")
                    .add_file(piston_rspy.File(name="m.py",
                                               content="import sys\nprint('hi', sys.argv[1:])"))
                    .add_args(["from", "rspy"]))
        response = await client.execute(executor)
        return names, response.run.stdout, response.run.code, response.language

    return asyncio.run(main())


async def test_a_real_piston_client(server):
    with trio.fail_after(CAP):
        names, stdout, code, language = await trio.to_thread.run_sync(
            piston_rspy_execute, f"{server}/api/v2")
    assert {"python", "sh", "shc"} <= names
    assert (stdout, code, language) == ("hi ['from', 'rspy']\n", 0, "python")


async def test_the_token_as_piston_clients_send_it(start_server, python_config):
    secret = "piston-key"
    with trio.fail_after(CAP):
        client = await start_server(python_config(token=secret))
        base = str(client.base_url)
        async with httpx.AsyncClient(base_url=base, timeout=CAP) as anonymous:
            r = await anonymous.get("/api/v2/runtimes")
            assert (r.status_code, r.json()) == (401, {"message": "missing or wrong token"})
            for auth in (secret, f"Bearer {secret}"):
                r = await anonymous.get("/api/v2/runtimes", headers={"Authorization": auth})
                assert r.status_code == 200
            # The bare key is Piston's way only: the rest of the API wants the bearer.
            r = await anonymous.get("/fn", headers={"Authorization": secret})
            assert r.status_code == 401
        _, stdout, code, _ = await trio.to_thread.run_sync(
            piston_rspy_execute, f"{base}/api/v2", secret)
        assert (stdout, code) == ("hi ['from', 'rspy']\n", 0)
