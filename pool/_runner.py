"""How a function runs inside one container: through the agent, or through plain exec.

Both runners have the same surface (``start``, ``run``, ``drop``, ``alive``, ``aclose``)
and the same behaviour: files, env, stdin, live capped output, timeout, cancel, and no
process left behind. The pool decides once per image which one its containers use.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import struct
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from ._docker import Engine, EngineError, ExecStream
from ._types import BadFile, File, Job, Result, check_files

log = logging.getLogger("pool")

WORKDIR_ROOT = "/tmp/ufaas"
AGENT_SOURCE = (Path(__file__).with_name("_agent.py")).read_text()
# The flag lets the agent do what only makes sense in a pool's container (wipe /tmp).
AGENT_ARGV = ["python3", "-I", "-c", AGENT_SOURCE, "--in-pool-container"]
_HEAD = struct.Struct(">II")
# Beyond the function's own timeout, how long we wait for its end before calling the
# container broken.
KILL_GRACE = 3.0
START_TIMEOUT = 20.0
STDIN_CHUNK = 65536

OnOutput = Callable[[int, bytes], None]
# Live stdin: each chunk is fed as it comes; the channel's end is end-of-file.
Stdin = trio.abc.ReceiveChannel[bytes]


class NoAgent(Exception):
    """The image cannot run the agent (no python3): use plain exec instead."""


class ContainerLost(Exception):
    """The container or its agent stopped answering."""


class Output:
    """stdout and stderr of one run, each capped at ``cap`` bytes.

    Each kept chunk goes to ``on_output`` as it comes, and only there: the caller then
    holds the one copy. Without ``on_output`` the chunks are kept for the result.
    """

    def __init__(self, cap: int, on_output: OnOutput | None) -> None:
        self.cap = cap
        self.sizes = {1: 0, 2: 0}
        self.truncated = False
        self.parts: dict[int, list[bytes]] = {1: [], 2: []}
        self.on_output = on_output or self._keep

    def _keep(self, fd: int, data: bytes) -> None:
        self.parts[fd].append(data)

    def add(self, fd: int, data: bytes) -> None:
        if fd not in self.sizes:
            return
        room = self.cap - self.sizes[fd]
        if len(data) > room:
            data = data[:max(room, 0)]
            self.truncated = True
        if not data:
            return
        self.sizes[fd] += len(data)
        self.on_output(fd, data)

    def fill(self, result: Result) -> Result:
        result.stdout = b"".join(self.parts[1])
        result.stderr = b"".join(self.parts[2])
        result.truncated = result.truncated or self.truncated
        return result


class Runner(Protocol):
    alive: bool

    async def start(self, nursery: trio.Nursery) -> None: ...

    async def run(self, job: Job, workdir: str, on_output: OnOutput | None = None,
                  stdin: Stdin | None = None) -> Result: ...

    def drop(self, workdir: str) -> None:
        """Forget a working directory; it is deleted as part of the next run."""

    async def aclose(self) -> None: ...


class _AgentRun:
    def __init__(self, output: Output) -> None:
        self.output = output
        self.done = trio.Event()
        self.exit: dict | None = None


class AgentRunner:
    """Talks to the in-container agent over one held-open exec stream.

    After ``start`` no Docker API call is made per function: a run is one message out
    and a few back.
    """

    def __init__(self, engine: Engine, cid: str,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.cid = cid
        self.alive = False
        self.tainted = False
        self.on_lost = on_lost
        self.drops: list[str] = []
        self._stream: ExecStream | None = None
        self._exec_id = ""
        self._buf = bytearray()
        self._runs: dict[str, _AgentRun] = {}
        self.agent_stderr = bytearray()

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the agent; raise NoAgent when the image has no usable python3."""
        with trio.fail_after(START_TIMEOUT):
            self._exec_id = await self.engine.exec_create(self.cid, AGENT_ARGV)
            self._stream = await self.engine.exec_open(self._exec_id)
            await self._send({"op": "hello"})
            hello = await self._next_frame()
        if hello is None or hello[0].get("ev") != "hello":
            await self._stream.aclose()
            info = await self.engine.exec_inspect(self._exec_id)
            raise NoAgent(f"agent did not start (exit {info.get('ExitCode')}): "
                          f"{bytes(self.agent_stderr[-300:]).decode(errors='replace')}")
        self.alive = True
        nursery.start_soon(self._read_forever)

    async def _send(self, header: dict, body: bytes = b"") -> None:
        assert self._stream is not None
        data = json.dumps(header, separators=(",", ":")).encode()
        await self._stream.send(_HEAD.pack(len(data), len(body)) + data + body)

    async def _next_frame(self) -> tuple[dict, bytes] | None:
        assert self._stream is not None
        while True:
            if len(self._buf) >= _HEAD.size:
                hlen, blen = _HEAD.unpack_from(self._buf)
                end = _HEAD.size + hlen + blen
                if len(self._buf) >= end:
                    header = json.loads(bytes(self._buf[_HEAD.size:_HEAD.size + hlen]))
                    body = bytes(self._buf[_HEAD.size + hlen:end])
                    del self._buf[:end]
                    return header, body
            got = await self._stream.receive()
            if got is None:
                return None
            fd, data = got
            if fd == 1:
                self._buf += data
            elif len(self.agent_stderr) < 65536:
                self.agent_stderr += data

    async def _read_forever(self) -> None:
        try:
            while True:
                frame = await self._next_frame()
                if frame is None:
                    break
                header, body = frame
                run = self._runs.get(header.get("id", ""))
                ev = header.get("ev")
                if ev == "out" and run is not None:
                    run.output.add(header["fd"], body)
                elif ev == "exit" and run is not None:
                    run.exit = header
                    run.done.set()
                elif ev == "error":
                    log.warning("agent in %s: %s", self.cid[:12], header.get("message"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as exc:
            log.info("agent stream of %s ended: %s", self.cid[:12], exc)
        finally:
            self.alive = False
            for run in self._runs.values():
                run.done.set()
            if self.on_lost is not None:  # the pool replaces us now, not at its next check
                self.on_lost()

    async def run(self, job: Job, workdir: str, on_output: OnOutput | None = None,
                  stdin: Stdin | None = None) -> Result:
        if not self.alive:
            raise ContainerLost("agent is not running")
        rid = job.id or uuid.uuid4().hex
        run = _AgentRun(Output(job.output_cap, on_output))
        self._runs[rid] = run
        files = [{"path": f.path, "size": len(f.data), "mode": f.mode} for f in job.files]
        body = b"".join(f.data for f in job.files) + (job.stdin or b"")
        header = {
            "op": "run", "id": rid, "argv": job.argv, "env": job.env, "workdir": workdir,
            "files": files, "timeout": job.timeout, "stdin_eof": stdin is None,
            "cap": job.output_cap, "drop": self.drops,
        }
        self.drops = []
        try:
            await self._send(header, body)
            if stdin is None:
                with trio.move_on_after(job.timeout + KILL_GRACE):
                    await run.done.wait()
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward_stdin, rid, stdin)
                    with trio.move_on_after(job.timeout + KILL_GRACE):
                        await run.done.wait()
                    nursery.cancel_scope.cancel()
            if not run.done.is_set():
                # The agent should have killed it at the deadline; ask once more.
                with trio.CancelScope(shield=True):
                    await self._stop(rid, run)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop(rid, run)
            raise
        finally:
            self._runs.pop(rid, None)
        return self._result(run)

    async def _forward_stdin(self, rid: str, stdin: Stdin) -> None:
        try:
            async for chunk in stdin:
                for i in range(0, len(chunk), STDIN_CHUNK):
                    await self._send_whole({"op": "stdin", "id": rid, "eof": False},
                                           chunk[i:i + STDIN_CHUNK])
            await self._send_whole({"op": "stdin", "id": rid, "eof": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the agent stream is gone: the reader notices and ends the run

    async def _send_whole(self, header: dict, body: bytes = b"") -> None:
        """Send one frame even when cancelled half-way: half a frame would wreck the stream."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + KILL_GRACE
            await self._send(header, body)
        if scope.cancelled_caught:
            self.tainted = True
            raise trio.BrokenResourceError("agent stopped reading")

    async def _stop(self, rid: str, run: _AgentRun) -> None:
        """Cancel a run and wait briefly for its end; taint the container if it won't end."""
        if run.done.is_set():
            return
        with trio.move_on_after(KILL_GRACE):
            try:
                await self._send({"op": "cancel", "id": rid})
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await run.done.wait()
        if not run.done.is_set() or run.exit is None:
            self.tainted = True

    def _result(self, run: _AgentRun) -> Result:
        ex = run.exit
        if ex is None:
            self.tainted = True
            why = "container stopped" if not self.alive else "agent did not answer"
            return run.output.fill(Result("error", error=f"{why} while the function ran"))
        if not ex.get("clean", True):
            self.tainted = True
        if "refused" in ex:
            return Result("refused", error=ex["refused"])
        if "error" in ex:
            return run.output.fill(Result("error", error=ex["error"]))
        outcome = "exited"
        if ex.get("timed_out"):
            outcome = "timeout"
            self.tainted = True
        elif ex.get("cancelled"):
            outcome = "cancelled"
        truncated = any((ex.get("truncated") or {}).values())
        return run.output.fill(Result(
            outcome, exit_code=ex.get("exit_code"), signal=ex.get("signal"),
            duration_ms=ex.get("duration_ms"), truncated=truncated, oom=bool(ex.get("oom")),
        ))

    def drop(self, workdir: str) -> None:
        # Carried by the next run message: no extra message on the hot path.
        self.drops.append(workdir)

    async def aclose(self) -> None:
        self.alive = False
        if self._stream is not None:
            await self._stream.aclose()


# Kill every process but the protected ones and this shell: nothing of a function may
# outlive it. $PROT is filled in once per container.
_KILL_OTHERS = (
    'for d in /proc/[0-9]*; do p=${d#/proc/}; case " $PROT $$ " in *" $p "*) ;; '
    '*) kill -9 "$p" 2>/dev/null;; esac; done'
)
# Empty the shared temporary directories but the workdirs' root, as the agent does.
# Each rm is a fork (~0.4 ms): only for what exists, not for a glob that matched nothing.
_WIPE_TEMP = (
    f'for f in /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]* /dev/shm/* /dev/shm/.[!.]*; do '
    f'[ "$f" = {WORKDIR_ROOT} ] || {{ {{ [ -e "$f" ] || [ -L "$f" ]; }} && rm -rf "$f"; }} '
    '2>/dev/null; done'
)
# Sets $_ufaas_n to the memory cgroup's OOM kill count (v2, then v1), or 0 where the
# kernel does not say; a function, not $(...), which would fork a subshell. Variables set
# before the function runs have names its own environment will not use.
_OOM_KILLS = (
    "oom_kills() { _ufaas_n=0; for f in /sys/fs/cgroup/memory.events "
    "/sys/fs/cgroup/memory/memory.oom_control; do [ -r $f ] || continue; "
    'while read -r k v; do [ "$k" = oom_kill ] && _ufaas_n=$v && return; done < $f; done; }'
)
# True when the working directories' filesystem has under 1/8 of it free, as in the agent.
_DISK_LOW = (f"s=$(stat -f -c '%a %b' {WORKDIR_ROOT} 2>/dev/null) && set -- $s && "
             '[ $(($1 * 8)) -lt "$2" ]')


class _MarkedOutput(Output):
    """Output that takes the line ``<marker> <disk_low> <oom> <exit code>``, written by our
    script after the function, off the end of stderr. The marker is random per run, so a
    function cannot fake it."""

    def __init__(self, cap: int, on_output: OnOutput | None, marker: bytes) -> None:
        super().__init__(cap, on_output)
        self.pattern = re.compile(re.escape(marker) + rb" ([01]) ([01]) ([0-9]{1,3})\n\Z")
        self.disk_low = False
        self.oom = False
        self.exit_code: int | None = None  # None: the script did not get to say

    def add(self, fd: int, data: bytes) -> None:
        if fd == 2 and (found := self.pattern.search(data)) is not None:
            self.disk_low, self.oom = found.group(1) == b"1", found.group(2) == b"1"
            self.exit_code = int(found.group(3))
            data = data[:found.start()]
        super().add(fd, data)


class ExecRunner:
    """Runs each function as a plain ``docker exec`` (images without python3).

    Costs two engine calls per function (create, start; an inspect too when our script
    could not report the exit code), plus one to deliver files, against the agent's none.
    """

    def __init__(self, engine: Engine, cid: str) -> None:
        self.engine = engine
        self.cid = cid
        self.alive = False
        self.tainted = False
        self.protected = "1"
        self.drops: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        code, out, err = await self._exec(["sh", "-c", "cd /proc && echo [0-9]*; echo $$"])
        lines = out.decode().split()
        if code != 0 or not lines:
            raise EngineError(f"container does not run sh: {err[-200:]!r}")
        me = lines[-1]
        self.protected = " ".join(sorted({p for p in lines[:-1] if p != me} | {"1"}))
        self.alive = True

    async def _exec(self, argv: list[str], stdin: bytes = b"",
                    env: dict[str, str] | None = None) -> tuple[int | None, bytes, bytes]:
        output = Output(1 << 20, None)
        code = await self._exec_stream(argv, stdin, env, output)
        return code, b"".join(output.parts[1]), b"".join(output.parts[2])

    async def _exec_stream(self, argv: list[str], stdin: bytes, env: dict[str, str] | None,
                           output: Output, live: Stdin | None = None) -> int | None:
        exec_id = await self.engine.exec_create(self.cid, argv, env=env)
        stream = await self.engine.exec_open(exec_id)
        try:
            # Stdin is written while output is read: a function that answers as it reads
            # could otherwise fill its output pipe and never read the rest.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed, stream, stdin, live)
                while (got := await stream.receive()) is not None:
                    output.add(*got)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if isinstance(output, _MarkedOutput) and output.exit_code is not None:
            return output.exit_code  # said by our script: saves an engine call
        info = await self.engine.exec_inspect(exec_id)
        return info.get("ExitCode")

    @staticmethod
    async def _feed(stream: ExecStream, first: bytes, live: Stdin | None) -> None:
        try:
            if first:
                await stream.send(first)
            if live is not None:
                async for chunk in live:
                    await stream.send(chunk)
            await stream.close_stdin()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the function ended, or closed its stdin

    async def _kill_others(self) -> None:
        with trio.move_on_after(KILL_GRACE) as scope:
            await self._exec(["sh", "-c", f"PROT='{self.protected}'; {_KILL_OTHERS}"])
        if scope.cancelled_caught:
            self.tainted = True

    async def run(self, job: Job, workdir: str, on_output: OnOutput | None = None,
                  stdin: Stdin | None = None) -> Result:
        wd = f"{WORKDIR_ROOT}/{workdir}"
        if job.files:
            try:
                # The tar that delivers them follows paths as given: check them here.
                check_files(job.files)
            except BadFile as exc:
                return Result("refused", error=str(exc))
            refused = await self._put_files(wd, job.files)
            if refused:
                return Result("refused", error=refused)
        env = {"UFAAS_WORKDIR": wd, "HOME": wd, "PWD": wd, **job.env}
        # After the function, our script reports on stderr (then taken off it) whether
        # the disk is left nearly full (the container is replaced) and whether the kernel
        # OOM-killed something meanwhile, as the agent does.
        marker = f"ufaas-{uuid.uuid4().hex}"
        # Forgotten workdirs go in the same exec: a separate one would double engine calls.
        drops = "".join(f"rm -rf {WORKDIR_ROOT}/{d}; " for d in self.drops)
        self.drops = []
        script = (f'{drops}{_OOM_KILLS}; oom_kills; _ufaas_b=$_ufaas_n; '
                  f'{{ [ -d "$0" ] || mkdir -p "$0"; }} && cd "$0" || exit 126; '
                  f'"$@"; rc=$?; PROT=\'{self.protected}\'; {_KILL_OTHERS}; {_WIPE_TEMP}; '
                  f"d=0; {_DISK_LOW} && d=1; oom_kills; o=0; "
                  '[ "$_ufaas_n" != "$_ufaas_b" ] && o=1; '
                  f"printf '{marker} %s %s %s\\n' $d $o $rc >&2; exit $rc")
        output = _MarkedOutput(job.output_cap, on_output, marker.encode())
        started = time.monotonic()
        outcome = "exited"
        code: int | None = None
        try:
            with trio.move_on_after(job.timeout) as deadline:
                code = await self._exec_stream(["sh", "-c", script, wd, *job.argv],
                                               job.stdin or b"", env, output, stdin)
            if deadline.cancelled_caught:
                outcome = "timeout"
                self.tainted = True
                with trio.CancelScope(shield=True):
                    await self._kill_others()
        except BaseException:
            # Cancelled, possibly wrapped in an ExceptionGroup by the stream's nursery.
            with trio.CancelScope(shield=True):
                await self._kill_others()
            raise
        duration = (time.monotonic() - started) * 1000.0
        result = Result(outcome, duration_ms=round(duration, 3))
        if outcome == "exited":
            if code is None:
                result = Result("error", error="exec ended without an exit code")
            elif code > 128 and code <= 128 + 64:
                if code == 137 and not await self._container_running():
                    self.alive = False
                    result = Result("error", error="container stopped while the function ran")
                else:
                    result.signal = code - 128
            else:
                result.exit_code = code
        if output.disk_low:
            self.tainted = True
        result.oom = output.oom
        return output.fill(result)

    async def _container_running(self) -> bool:
        try:
            info = await self.engine.inspect(self.cid)
        except EngineError:
            return False
        return bool(info.get("State", {}).get("Running"))

    async def _put_files(self, wd: str, files: list[File]) -> str | None:
        # Refuse to write through a symlink left by an earlier function in this workdir.
        parents = sorted({"/".join(f.path.split("/")[:i])
                          for f in files for i in range(1, f.path.count("/") + 1)})
        checks = "".join(
            f'if [ -L {shlex.quote(p)} ] || {{ [ -e {shlex.quote(p)} ] && '
            f'[ ! -d {shlex.quote(p)} ]; }}; then echo {shlex.quote(p)}: '
            f'not a directory inside the working directory >&2; exit 3; fi; '
            for p in parents
        )
        checks += "".join(f"if [ -L {shlex.quote(f.path)} ]; then rm -f {shlex.quote(f.path)};"
                          " fi; " for f in files)
        script = f'umask 077; mkdir -p "$0" && cd "$0" || exit 126; {checks}umask 0; exec tar -xf -'
        code, _, err = await self._exec(["sh", "-c", script, wd], stdin=tar_files(files))
        if code == 3:
            return err.decode(errors="replace").strip()
        if code != 0:
            raise EngineError(f"could not deliver files (exit {code}): {err[-300:]!r}")
        return None

    def drop(self, workdir: str) -> None:
        self.drops.append(workdir)

    async def aclose(self) -> None:
        self.alive = False


def tar_files(files: list[File]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        now = time.time()
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.size = len(f.data)
            info.mode = f.mode
            info.mtime = now
            tar.addfile(info, io.BytesIO(f.data))
    return buf.getvalue()
