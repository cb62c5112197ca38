"""Python functions forked from a warm interpreter (pool/_zygote.py) behave as
``python3 main.py`` does, see nothing of each other, and survive a zygote that dies or
hangs.

The parity table runs each script both ways on one real server, in one container: fresh
(``fresh_interpreter``) and forked, and wants the same stdout, stderr, exit code and signal.
"""

from __future__ import annotations

import base64
import io
import re
import zipfile
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from command import module_server

from pool import Job, Pool, Profile
from ufaas.config import PoolConfig

CAP = 60
PRELOAD = ["json", "decimal", "random", "threading", "subprocess", "no_such_module_here"]
# Each function's working directory has a name of its own: outputs are compared without it.
WORKDIR = re.compile(r"/tmp/ufaas/[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(docker_client, images, tmp_path_factory, module_labels):
    with module_server("zygote", tmp_path_factory, module_labels,
                       pools=[PoolConfig(image=images.python, min_idle=1, max=1,
                                         preload=PRELOAD)]) as url:
        yield url


@pytest.fixture
async def client(server):
    async with httpx.AsyncClient(base_url=server, timeout=CAP) as c:
        yield c


def resource(path, content):
    if isinstance(content, bytes):
        return {"path": path, "base64": base64.b64encode(content).decode()}
    return {"path": path, "text": content}


async def run(client, image, command, *, files=(), fresh=False, **kw):
    body = {"image": image, "command": command, "fresh_interpreter": fresh,
            "resources": [resource(p, c) for p, c in files], **kw}
    r = await client.post("/fn?wait=30", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def seen(rec):
    """What a caller observes of a run."""
    return {k: WORKDIR.sub("<wd>", rec[k]) if isinstance(rec[k], str) else rec[k]
            for k in ("status", "exit_code", "signal", "stdout", "stderr")}


def main(source, *args, extra=(), **kw):
    """A case: ``python3 main.py args`` with ``source`` as main.py (and ``extra`` files)."""
    return {"command": ["python3", "main.py", *args], "files": [("main.py", source), *extra],
            **kw}


HELPER = "X = 42\nif __name__ == '__main__':\n    import sys\n    print('main', sys.argv)\n"
CASES = {
    "print": main("print('hello')\n"),
    "argv": main("import sys\nprint(sys.argv, sys.orig_argv)\n", "a", "b c", ""),
    "main globals": main(
        "print(__name__, __file__, __doc__, __package__, __spec__, __cached__)\n"
        "print(type(__loader__).__name__, __loader__.name, __loader__.path)\n"
        "print(sorted(globals()), __builtins__, __annotations__)\n"
        "import __main__, sys\nprint(__main__.__dict__ is globals(), sys.modules['__main__'])\n"),
    "docstring": main('"""The doc."""\nprint(__doc__)\n'),
    "sys.path and a sibling": {
        "command": ["python3", "main.py"],
        "files": [("main.py", "import sys, helper\nprint(sys.path[0], helper.X)\n"),
                  ("helper.py", HELPER)]},
    "script in a directory": {
        "command": ["python3", "sub/main.py"],
        "files": [("sub/main.py", "import sys, os\nprint(sys.path[0], __file__, os.getcwd())\n")]},
    "-c": {"command": ["python3", "-c", "import sys; print(sys.argv, repr(sys.path[0]))", "x"]},
    "-c globals": {"command": ["python3", "-c",
                               "print(sorted(globals()), __loader__, __spec__, __name__)"]},
    "-m": {"command": ["python3", "-m", "helper", "arg"], "files": [("helper.py", HELPER)]},
    "-m missing": {"command": ["python3", "-m", "no_such_module_either"]},
    "-u": {"command": ["python3", "-u", "main.py"], "files": [(
        "main.py", "import sys\nprint(sys.stdout.write_through, type(sys.stdout.buffer))\n"
                   "print(sys.stdout.line_buffering, sys.stderr.line_buffering)\n")]},
    "absolute interpreter": {"command": ["/usr/bin/python3", "-c", "print('abs')"]},
    "python3.11": {"command": ["python3.11", "-c", "print('versioned')"]},
    "flags together": {"command": ["/usr/bin/python3.11", "-uB", "-c",
                                   "import sys; print(sys.dont_write_bytecode)"]},
    "exit code": main("import sys\nprint('bye')\nsys.exit(3)\n"),
    "exit code wraps": main("import sys\nsys.exit(256 + 7)\n"),
    "exit None": main("raise SystemExit\n"),
    "exit message": main("import sys\nsys.exit('it went wrong')\n"),
    "exit object": main("import sys\nsys.exit([1, 2])\n"),
    "exception": main("def f():\n    return g()\ndef g():\n    return 1 / 0\n"
                      "print('before')\nf()\n"),
    "chained exception": main("try:\n    {}['k']\nexcept KeyError as e:\n"
                              "    raise ValueError('bad') from e\n"),
    "syntax error": main("print('never'\nx = (\n"),
    "syntax error in -c": {"command": ["python3", "-c", "def (:"]},
    "KeyboardInterrupt": main("print('working', flush=True)\nraise KeyboardInterrupt\n"),
    "os._exit loses buffers": main("import os\nprint('lost')\nos._exit(5)\n"),
    "atexit": main("import atexit\natexit.register(print, 'at exit')\n"
                   "atexit.register(lambda: print('first'))\nprint('main')\n"),
    "buffered output at exit": main("import sys\nfor i in range(3000):\n    print(i)\n"
                                    "sys.stderr.write('tail')\n"),
    "threads joined": main("import threading, time\n"
                           "def late():\n    time.sleep(0.2)\n    print('thread done')\n"
                           "threading.Thread(target=late).start()\n"
                           "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                           "print('main done')\n"),
    "signals": main(
        "import signal\n"
        "print([(s.name, signal.getsignal(s)) for s in signal.Signals\n"
        "       if s not in (signal.SIGKILL, signal.SIGSTOP)])\n"
        "print(signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"),
    "killed by a signal": main("import os, signal\nprint('x', flush=True)\n"
                               "os.kill(os.getpid(), signal.SIGTERM)\n"),
    "environment": main("import os\nprint(sorted(os.environ.items()))\n",
                        env={"GREETING": "hi there", "EMPTY": ""}),
    "a subprocess's environment": main(
        "import subprocess\nprint(sorted(subprocess.run(['env'], capture_output=True, "
        "text=True).stdout.splitlines()))\n", env={"GREETING": "hi"}),
    "stdin": main("import sys\nprint(repr(sys.stdin.read()))\n",
                  stdin="line one\r\nzwei \u00e9\u00e8\n\u2603 end"),
    "input()": main("name = input('name? ')\nprint('hello', name)\n", stdin="ada\n"),
    "standard streams": main(
        "import sys\nfor s in (sys.stdin, sys.stdout, sys.stderr):\n"
        "    print(s.name, s.mode, s.encoding, s.errors, s.line_buffering, s.isatty(),\n"
        "          s.fileno(), type(s.buffer).__name__, s.buffer.raw.name)\n"
        "print(sys.stdout is sys.__stdout__, sys.getfilesystemencoding())\n"),
    "surrogates out": main("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe raw\\n')\n"
                           "print('\\udcff')\n"),
    "who and where": main(
        "import os, resource\n"
        "print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())\n"
        "print(os.getcwd(), os.umask(0), os.getpgrp() == os.getpid(),\n"
        "      os.getsid(0) == os.getpid())\n"
        "print([resource.getrlimit(getattr(resource, n)) for n in dir(resource)\n"
        "       if n.startswith('RLIMIT_')])\n"),
    "own /proc": main("import os\nprint(sorted(os.listdir('/proc/self/fd')))\n"
                      "print(open('/proc/self/status').read().count('Uid:'))\n"
                      "print(open('/proc/self/cmdline', 'rb').read()\n"
                      "      .replace(b'\\0', b' ').split())\n"),
    "recursion limit": main("import sys\ndef f(n):\n    try:\n        return f(n + 1)\n"
                            "    except RecursionError:\n        return n\n"
                            "print(sys.getrecursionlimit(), f(0))\n"),
    "warnings": main("import warnings\nwarnings.warn('careful')\nprint('went on')\n"),
    "imports as usual": main("import json, decimal, email.utils, csv, sys\n"
                             "print(json.dumps({'a': [1, 2]}), decimal.Decimal('1.10'))\n"
                             "print('no_such_module_here' in sys.modules)\n"),
    "interpreter": main("import sys\nprint(sys.executable, sys.prefix, sys.version_info[:2],\n"
                        "      sys.flags.dont_write_bytecode, sys.dont_write_bytecode)\n"),
    "exit() builtin": main("print('q')\nexit(4)\n"),
    "timeout": main("import time\nprint('tick', flush=True)\ntime.sleep(30)\n", timeout=1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_a_forked_function_acts_as_a_fresh_interpreter(client, images, case):
    spec = CASES[case]
    with trio.fail_after(CAP):
        fresh = await run(client, images.python, fresh=True, **spec)
        forked = await run(client, images.python, **spec)
    assert fresh["forked"] is False and forked["forked"] is True, (fresh, forked)
    assert fresh["container"] == forked["container"]
    assert seen(forked) == seen(fresh)


def _zipped(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


@pytest.mark.parametrize(("case", "spec"), [
    ("a file beside the script shadows a preloaded module",
     main("import json\nprint(json.X)\n", extra=[("json.py", "X = 'mine'\n")])),
    ("a package beside it too",
     main("import decimal\nprint(decimal.X)\n", extra=[("decimal/__init__.py", "X = 2\n")])),
    ("an interpreter variable", main("print(hash('x'))\n", env={"PYTHONHASHSEED": "1"})),
    ("a locale variable", main("import sys\nprint(sys.stdout.encoding)\n", env={"LC_ALL": "C"})),
    ("a flag a fork cannot honour", {"command": ["python3", "-O", "-c", "print(__debug__)"]}),
    ("-X", {"command": ["python3", "-X", "dev", "-c", "import sys; print(sys.flags.dev_mode)"]}),
    ("stdin as the script", {"command": ["python3", "-"], "stdin": "print('from stdin')\n"}),
    ("a missing script", {"command": ["python3", "nowhere.py"]}),
    ("a zip application", {"command": ["python3", "app.zip"], "files": [
        ("app.zip", _zipped({"__main__.py": "print('zipped')\n"}))]}),
    ("a user site", main("import sys\nprint(sys.path[-1].endswith('site-packages'))\n",
                         extra=[(".local/lib/python3.11/site-packages/x.pth", "")])),
    ("not python itself", {"command": ["sh", "-c", "python3 -c 'print(1)'"]}),
], ids=lambda v: v if isinstance(v, str) else "")
async def test_what_a_fork_would_get_wrong_starts_fresh(client, images, case, spec):
    with trio.fail_after(CAP):
        first = await run(client, images.python, **spec)
        fresh = await run(client, images.python, fresh=True, **spec)
    assert first["forked"] is False, first
    assert seen(first) == seen(fresh)


async def test_calls_differ_where_fresh_ones_would(client, images):
    code = ("import os, random, uuid, tempfile\n"
            "print(random.random(), os.urandom(8).hex(), uuid.uuid4(), tempfile.mktemp())\n")
    with trio.fail_after(CAP):
        runs = [await run(client, images.python, ["python3", "-c", code]) for _ in range(3)]
    assert all(r["forked"] for r in runs)
    values = [r["stdout"].split() for r in runs]
    for column in zip(*values, strict=True):
        assert len(set(column)) == 3, values


async def test_the_output_cap_and_usage(client, images):
    code = "import sys\nsys.stdout.write('x' * (3 << 20))\nb = bytearray(64 << 20)\n"
    with trio.fail_after(CAP):
        forked = await run(client, images.python, ["python3", "-c", code])
        fresh = await run(client, images.python, ["python3", "-c", code], fresh=True)
    for rec in (forked, fresh):
        assert rec["truncated"] and rec["status"] == "succeeded", seen(rec)
        assert len(rec["stdout"]) == 1 << 20
        # The kernel's accounting of the function's own process: its 64 MiB are there.
        assert rec["max_rss"] > 64 << 20 and rec["cpu_ms"] > 0
    assert forked["forked"] and not fresh["forked"]


async def test_a_timeout_kills_everything_the_function_started(client, images):
    code = ("import subprocess, threading, time\n"
            "subprocess.Popen(['sleep', '300'])\n"
            "subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300'], start_new_session=True)\n"
            "threading.Thread(target=time.sleep, args=(300,)).start()\n"
            "print('started', flush=True)\n")
    with trio.fail_after(CAP):
        rec = await run(client, images.python, ["python3", "-c", code], timeout=1)
        after = await run(client, images.python, ["python3", "-c", LEFT_BEHIND])
    assert rec["forked"] and rec["status"] == "timeout" and rec["stdout"] == "started\n", rec
    assert after["container"] == rec["container"]
    assert after["stdout"] == "[]\n[]\n", after


# What a function finds of earlier ones: other processes of its uid, and files in the
# places shared by every function of a container.
LEFT_BEHIND = ("import os\n"
               "def uid(p):\n"
               "    try:\n"
               "        return os.stat('/proc/' + p).st_uid\n"
               "    except OSError:\n"
               "        return None\n"
               "print([p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()\n"
               "       and uid(p) == os.getuid()])\n"
               "print([os.path.join(d, n) for d in ('/tmp', '/var/tmp', '/dev/shm')\n"
               "       for n in os.listdir(d) if n != 'ufaas'])\n")


async def test_functions_forked_from_one_zygote_see_nothing_of_each_other(client, images):
    meddler = (
        "import builtins, decimal, json, os, random, sys, threading, time\n"
        "json.dumps = lambda *a, **k: 'forged'\n"
        "builtins.planted = True\n"
        "sys.modules['planted_module'] = sys\n"
        "sys.path.insert(0, '/tmp')\n"
        "decimal.getcontext().prec = 3\n"
        "random.seed(1)\n"
        "os.environ['PLANTED'] = '1'\n"
        "threading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n"
        "for place in ('/tmp/planted', '/var/tmp/planted', '/dev/shm/planted'):\n"
        "    open(place, 'w').write('x')\n"
        "open('mine.txt', 'w').write('secret')\n"
        "print(os.getcwd())\n"
        "fds = []\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        fds.append(fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('descriptors', [f for f in fds if f != 3 or os.path.exists('/proc/self/fd/3')])\n"
        "zygote = os.getppid()\n"
        "for what in ('environ', 'mem', 'fd', 'maps'):\n"
        "    try:\n"
        "        os.listdir(f'/proc/{zygote}/fd') if what == 'fd' else "
        "open(f'/proc/{zygote}/{what}', 'rb').read(1)\n"
        "        print('read', what)\n"
        "    except OSError as e:\n"
        "        print('refused', what, e.errno)\n"
        "try:\n"
        "    os.kill(zygote, 0)\n"
        "    print('could signal the zygote')\n"
        "except PermissionError:\n"
        "    print('cannot signal the zygote')\n")
    onlooker = (
        "import builtins, decimal, json, os, sys, threading\n"
        "print(json.dumps({'a': 1}), hasattr(builtins, 'planted'),\n"
        "      'planted_module' in sys.modules)\n"
        "print('/tmp' in sys.path, decimal.getcontext().prec, 'PLANTED' in os.environ)\n"
        "print(threading.active_count())\n"
        "try:\n"
        "    print(os.listdir('/tmp/ufaas'))\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n" + LEFT_BEHIND)
    with trio.fail_after(CAP):
        first = await run(client, images.python, ["python3", "-c", meddler])
        second = await run(client, images.python, ["python3", "-c", onlooker])
    assert first["forked"] and second["forked"], (first, second)
    assert first["container"] == second["container"]
    assert first["stdout"].splitlines()[1:] == [
        "descriptors []", "refused environ 13", "refused mem 13", "refused fd 13",
        "refused maps 13", "cannot signal the zygote"], seen(first)
    assert second["stdout"].splitlines() == [
        '{"a": 1} False False', "False 28 False", "1", "refused 13", "[]", "[]"], seen(second)


async def test_pools_show_their_zygotes(client, images):
    with trio.fail_after(CAP):
        await run(client, images.python, ["python3", "-c", "pass"])
        pools = (await client.get("/pools")).json()
    pool = next(p for p in pools if p["image"] == images.python)
    zygote = pool["zygote"]
    assert pool["profile"]["preload"] == PRELOAD and pool["profile"]["zygote"] is True
    assert zygote["ready"] == 1 and zygote["preload"] == PRELOAD, zygote
    # The module that is not there is named, with why; the rest were imported.
    assert list(zygote["failed"]) == ["no_such_module_here"]
    assert zygote["failed"]["no_such_module_here"].startswith("ModuleNotFoundError")
    assert 5 << 20 < zygote["rss"] < 200 << 20
    assert zygote["error"] is None



# -- a zygote that dies or hangs ---------------------------------------------------------
#
# Each test its own pool of one container: a zygote's deaths count against its container.


@asynccontextmanager
async def serving(engine, images, test_id, test_labels, preload=("json",)):
    async with trio.open_nursery() as nursery:
        pool = Pool(engine, images.python, Profile(preload=tuple(preload)),
                    instance=f"{test_id}-pool", labels=test_labels, min_idle=1, max=1)
        await nursery.start(pool.serve)
        await pool.wait_warm(timeout=CAP)
        yield pool
        nursery.cancel_scope.cancel()


async def call(pool, code, **kw):
    async with pool.lease() as lease:
        return await lease.run(Job(["python3", "-c", code], **kw))


async def signal_in(docker_client, pool, pid, signal):
    """Send ``signal`` to process ``pid`` of the pool's container, as root."""
    (container,) = [c.id for c in pool._containers.values()]
    got = await trio.to_thread.run_sync(lambda: docker_client.containers.get(container)
                                        .exec_run(["sh", "-c", f"kill -{signal} {pid}"], user="0"))
    assert got.exit_code == 0, got.output


ZYGOTE_PID = "import os; print(os.getppid())"


async def forked_again(pool):
    """Runs until a function is forked again (a new zygote is ready); its zygote's pid."""
    for _ in range(200):
        result = await call(pool, ZYGOTE_PID)
        assert result.exit_code == 0, result
        if result.forked:
            return int(result.stdout)
        await trio.sleep(0.05)
    raise AssertionError("no zygote came back")


async def test_a_killed_zygote_is_replaced(engine, images, test_id, test_labels,
                                           docker_client):
    with trio.fail_after(CAP):
        async with serving(engine, images, test_id, test_labels) as pool:
            zygote = await forked_again(pool)
            await signal_in(docker_client, pool, zygote, "KILL")
            # The next function runs: fresh while a new zygote starts, forked after.
            result = await call(pool, "print('still here')")
            assert (result.exit_code, result.stdout) == (0, b"still here\n"), result
            assert await forked_again(pool) != zygote
            stats = pool.statistics()
            assert stats.idle == 1 and stats.started == 1, stats  # the container stayed
            assert stats.zygote["ready"] == 1 and "exited" in stats.zygote["error"]


async def test_a_zygote_killed_under_its_function(engine, images, test_id, test_labels,
                                                  docker_client):
    code = ("import os, sys, time\nzygote = os.getppid()\nprint(zygote, flush=True)\n"
            "end = time.time() + 15\n"
            "while os.getppid() == zygote and time.time() < end:\n    time.sleep(0.01)\n"
            "print('orphaned' if os.getppid() != zygote else 'not orphaned')\nsys.exit(7)\n")
    with trio.fail_after(CAP):
        async with serving(engine, images, test_id, test_labels) as pool:
            zygote = await forked_again(pool)
            printed = trio.Event()

            def on_output(fd, data):
                printed.set()

            async with pool.lease() as lease, trio.open_nursery() as nursery:
                async def kill_it():
                    await printed.wait()
                    await signal_in(docker_client, pool, zygote, "KILL")

                nursery.start_soon(kill_it)
                result = await lease.run(Job(["python3", "-c", code], timeout=20), on_output)
            # Its zygote gone, the agent took its exit status itself.
            assert (result.outcome, result.exit_code, result.forked) == ("exited", 7, True)
            assert await forked_again(pool) != zygote


async def children_of(docker_client, pool, pid):
    (container,) = [c.id for c in pool._containers.values()]
    script = (f"for s in /proc/[0-9]*/status; do grep -q '^PPid:[[:space:]]*{pid}$' $s "
              "&& basename $(dirname $s); done; true")
    got = await trio.to_thread.run_sync(lambda: docker_client.containers.get(container)
                                        .exec_run(["sh", "-c", script], user="0"))
    return [int(p) for p in got.output.split()]


async def test_a_hung_zygote_is_replaced(engine, images, test_id, test_labels, docker_client):
    with trio.fail_after(CAP):
        async with serving(engine, images, test_id, test_labels) as pool:
            zygote = await forked_again(pool)
            await signal_in(docker_client, pool, zygote, "STOP")
            # Its spare was forked already: it runs the function, but the zygote never
            # says how the function ended; the agent gives it up and reaps the child.
            result = await call(pool, "import sys; print('ran'); sys.exit(3)")
            assert (result.exit_code, result.stdout, result.forked) == (3, b"ran\n", True)
            assert "did not report" in pool.statistics().zygote["error"]
            zygote = await forked_again(pool)
            # Now without a spare: one that died while its zygote hangs. The function
            # waits for another a while, then starts fresh.
            with trio.fail_after(10):
                while not (spares := await children_of(docker_client, pool, zygote)):
                    await trio.sleep(0.05)
            await signal_in(docker_client, pool, zygote, "STOP")
            await signal_in(docker_client, pool, spares[0], "KILL")
            result = await call(pool, "print('fresh after all')")
            assert (result.exit_code, result.stdout) == (0, b"fresh after all\n"), result
            assert not result.forked
            assert "did not fork" in pool.statistics().zygote["error"]
            assert await forked_again(pool) != zygote


async def test_a_zygote_starts_over_after_many_forks(engine, images, test_id, test_labels):
    with trio.fail_after(CAP):
        async with serving(engine, images, test_id, test_labels) as pool:
            seen = {}
            for _ in range(130):
                result = await call(pool, "import os; print(os.getppid(), hash('seed'))")
                assert result.exit_code == 0 and result.forked, result
                zygote, hashed = result.stdout.split()
                seen.setdefault(zygote, set()).add(hashed)
    # Children of one zygote share its string hashes' seed: a new one comes in time.
    assert len(seen) >= 2, seen
    assert all(len(h) == 1 for h in seen.values()) and len(set.union(*seen.values())) >= 2


async def test_a_preload_that_fails_is_told_and_skipped(engine, images, test_id, test_labels,
                                                        caplog):
    with trio.fail_after(CAP):
        async with serving(engine, images, test_id, test_labels,
                           preload=("json", "not_a_module_anywhere")) as pool:
            result = await call(pool, "import json, sys; print('json' in sys.modules)")
            assert (result.stdout, result.forked) == (b"True\n", True), result
            assert list(pool.statistics().zygote["failed"]) == ["not_a_module_anywhere"]
    assert any("not_a_module_anywhere" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


async def test_without_a_zygote_every_function_starts_fresh(engine, images, test_id,
                                                            test_labels):
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            pool = Pool(engine, images.python, Profile(zygote=False), instance=f"{test_id}-p",
                        labels=test_labels, min_idle=1, max=1)
            await nursery.start(pool.serve)
            result = await call(pool, "print('fresh')")
            assert (result.stdout, result.forked) == (b"fresh\n", False)
            assert pool.statistics().zygote is None
            nursery.cancel_scope.cancel()
