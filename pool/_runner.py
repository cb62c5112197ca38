"""How a function runs inside one container: through the agent, or through plain exec.

Both runners have the same surface (``start``, ``run``, ``drop``, ``alive``, ``aclose``)
and the same behaviour: files, env, stdin, live capped output, timeout, cancel, and no
process left behind. The pool decides once per image which one its containers use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shlex
import struct
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from ._agent import output_matches
from ._docker import Engine, EngineError, MuxStream
from ._types import BadFile, File, Job, OutputFile, Outputs, Result, check_files

log = logging.getLogger("pool")

WORKDIR_ROOT = "/tmp/ufaas"
AGENT_SOURCE = (Path(__file__).with_name("_agent.py")).read_text()
ZYGOTE_SOURCE = (Path(__file__).with_name("_zygote.py")).read_text()
# What the agent keeps of root: changing to the functions' uid and gid, and killing theirs.
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL")
# The main process of a container without python3: it only waits for its stdin to end,
# so that the container dies with its server (it is root, with no capability at all).
LIFELINE = ["sh", "-c", "read _; exit 0"]
_HEAD = struct.Struct(">II")
# The agent's frames, bounded before anything is allocated for them: its headers are small
# JSON, and it sends output in chunks of 64 KiB.
MAX_HEADER = 65536
MAX_BODY = 1 << 20
# Beyond the function's own timeout, how long we wait for its end before calling the
# container broken.
KILL_GRACE = 3.0
START_TIMEOUT = 20.0
STDIN_CHUNK = 65536

OnOutput = Callable[[int, bytes], None]
# Live stdin: each chunk is fed as it comes; the channel's end is end-of-file.
Stdin = trio.abc.ReceiveChannel[bytes]
# Output files: awaited with each piece of each file collected, in order (a file's first
# call may carry no bytes, so that an empty file is seen too).
OnFile = Callable[[str, bytes], Awaitable[None]]
# How long collecting a function's output files may take, at most.
COLLECT_TIMEOUT = 30.0


class Collector:
    """Output files as their pieces arrive: sizes and SHA-256 counted here, the bytes
    handed to ``on_file`` (or, without it, kept in ``OutputFile.data``)."""

    def __init__(self, on_file: OnFile | None) -> None:
        self.on_file = on_file
        self.files: list[OutputFile] = []
        self.truncated = False
        self._hash = hashlib.sha256()
        self._parts: list[bytes] = []

    def _close(self) -> None:
        if self.files:
            last = self.files[-1]
            last.sha256 = self._hash.hexdigest()
            if self.on_file is None:
                last.data = b"".join(self._parts)

    async def begin(self, path: str, truncated: bool) -> None:
        self._close()
        self._hash, self._parts = hashlib.sha256(), []
        self.files.append(OutputFile(path, truncated=truncated))
        if self.on_file is not None:
            await self.on_file(path, b"")

    async def add(self, data: bytes) -> None:
        current = self.files[-1]
        current.size += len(data)
        self._hash.update(data)
        if self.on_file is None:
            self._parts.append(data)
        else:
            await self.on_file(current.path, data)

    def done(self, result: Result) -> Result:
        self._close()
        result.files, result.files_truncated = self.files, self.truncated
        return result


def agent_argv(user: str) -> list[str]:
    """The agent as a pool container's command; the flag lets it do what only makes sense
    there (empty /tmp after each function)."""
    return ["python3", "-I", "-c", AGENT_SOURCE, "--in-pool-container", "--user", user]


class NoAgent(Exception):
    """The image cannot run the agent (no python3): use plain exec instead."""


class BadFrame(EngineError):
    """The agent's stream broke its framing: the container is not to be trusted."""


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

    async def collect(self, workdir: str, outputs: Outputs, files: Collector) -> None:
        """Hand the files of ``workdir`` that ``outputs`` names to ``files``; raise
        ContainerLost (or EngineError) when the container fails meanwhile."""

    def drop(self, workdir: str) -> None:
        """Forget a working directory; it is deleted as part of the next run."""

    async def aclose(self) -> None: ...


class _AgentRun:
    def __init__(self, output: Output) -> None:
        self.output = output
        self.done = trio.Event()
        self.exit: dict | None = None


class AgentRunner:
    """Talks to the agent, the container's main process, over its attached stream.

    After ``start`` no Docker API call is made per function: a run is one message out
    and a few back.
    """

    def __init__(self, engine: Engine, cid: str, stream: MuxStream,
                 on_lost: Callable[[], None] | None = None,
                 preload: tuple[str, ...] | None = None) -> None:
        """``preload``: the modules of a zygote for Python functions; None for none."""
        self.engine = engine
        self.preload = preload
        # The agent's last word on its zygote: state, error, failed preloads, memory.
        self.zygote: dict | None = None
        self.cid = cid
        self.alive = False
        self.tainted = False
        self.on_lost = on_lost
        self.drops: list[str] = []
        self._stream = stream
        self._buf = bytearray()
        self._runs: dict[str, _AgentRun] = {}
        self._collects: dict[str, trio.MemorySendChannel[tuple[dict, bytes]]] = {}
        self.agent_stderr = bytearray()

    async def start(self, nursery: trio.Nursery) -> None:
        """Greet the agent; raise NoAgent when it does not answer (no usable python3)."""
        try:
            with trio.fail_after(START_TIMEOUT):
                if self.preload is None:
                    await self._send({"op": "hello"})
                else:  # answered once the zygote is ready or has failed
                    await self._send({"op": "hello", "zygote": {"preload": self.preload}},
                                     ZYGOTE_SOURCE.encode())
                hello = await self._next_frame()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            hello = None
            self.agent_stderr += str(exc).encode()
        if hello is None or hello[0].get("ev") != "hello":
            await self._stream.aclose()
            raise NoAgent("agent did not start: "
                          f"{bytes(self.agent_stderr[-300:]).decode(errors='replace')}")
        self.zygote = hello[0].get("zygote")
        if self.zygote and self.zygote.get("error"):
            log.warning("container %s: %s", self.cid[:12], self.zygote["error"])
        self.alive = True
        nursery.start_soon(self._read_forever)

    async def _send(self, header: dict, body: bytes = b"") -> None:
        data = json.dumps(header, separators=(",", ":")).encode()
        await self._stream.send(_HEAD.pack(len(data), len(body)) + data + body)

    async def _next_frame(self) -> tuple[dict, bytes] | None:
        while True:
            if len(self._buf) >= _HEAD.size:
                hlen, blen = _HEAD.unpack_from(self._buf)
                if hlen > MAX_HEADER or blen > MAX_BODY:
                    raise BadFrame(f"the agent sent a frame of {hlen} + {blen} bytes")
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
                elif ev in ("file", "data", "collected"):
                    collect = self._collects.get(header.get("id", ""))
                    if collect is not None:
                        try:  # waits for the collector: the agent waits for us meanwhile
                            await collect.send((header, body))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # given up on
                elif ev == "zygote":
                    self.zygote = header
                    if header.get("error"):
                        log.warning("container %s: %s", self.cid[:12], header["error"])
                elif ev == "error":
                    log.warning("agent in %s: %s", self.cid[:12], header.get("message"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as exc:
            log.info("agent stream of %s ended: %s", self.cid[:12], exc)
        except EngineError as exc:  # a broken frame: whatever sent it is not to be trusted
            log.warning("container %s retired: %s", self.cid[:12], exc)
            self.tainted = True
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
        else:
            if self.agent_stderr:  # it died: say how
                tail = bytes(self.agent_stderr[-2000:]).decode(errors="replace")
                log.warning("agent in %s ended: %s", self.cid[:12], tail.strip())
        finally:
            self.alive = False
            for run in self._runs.values():
                run.done.set()
            for collect in self._collects.values():
                collect.close()
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
            "cap": job.output_cap, "drop": self.drops, "fresh": job.fresh,
            "cpu_limit": job.cpu_limit, "memory_limit": job.memory_limit,
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
        # A timed-out function was killed and cleaned up like any other (else "clean" said
        # otherwise above): its container serves on, so timeouts in a loop cost no engine.
        outcome = "exited"
        if ex.get("timed_out"):
            outcome = "timeout"
        elif ex.get("cancelled"):
            outcome = "cancelled"
        truncated = any((ex.get("truncated") or {}).values())
        return run.output.fill(Result(
            outcome, exit_code=ex.get("exit_code"), signal=ex.get("signal"),
            duration_ms=ex.get("duration_ms"), truncated=truncated, oom=bool(ex.get("oom")),
            forked=bool(ex.get("forked")), cpu_ms=ex.get("cpu_ms"), max_rss=ex.get("max_rss"),
        ))

    async def collect(self, workdir: str, outputs: Outputs, files: Collector) -> None:
        rid = uuid.uuid4().hex
        send, receive = trio.open_memory_channel[tuple[dict, bytes]](4)
        self._collects[rid] = send
        try:
            with trio.fail_after(COLLECT_TIMEOUT):
                await self._send({
                    "op": "collect", "id": rid, "workdir": workdir,
                    "patterns": list(outputs.patterns), "max_file": outputs.max_file,
                    "max_total": outputs.max_total, "max_count": outputs.max_count})
                async for header, body in receive:
                    ev = header.get("ev")
                    if ev == "file":
                        await files.begin(str(header["path"]), bool(header.get("truncated")))
                    elif ev == "data" and files.files:
                        await files.add(body)
                    elif ev == "collected":
                        files.truncated = bool(header.get("truncated"))
                        if header.get("error"):
                            raise ContainerLost(f"output files: {header['error']}")
                        return
            raise ContainerLost("the agent stopped while sending output files")
        except trio.TooSlowError:
            self.tainted = True  # it may still be sending: this container is done with
            raise ContainerLost(f"output files took over {COLLECT_TIMEOUT:g} s") from None
        finally:
            del self._collects[rid]
            receive.close()

    def drop(self, workdir: str) -> None:
        # Carried by the next run message: no extra message on the hot path.
        self.drops.append(workdir)

    async def aclose(self) -> None:
        self.alive = False
        if self._stream is not None:
            await self._stream.aclose()


# The exec fallback's own clean-up, in sh, run as the functions' user after each function.
# It kills every process of that user but itself (kill -1 spares PID 1 and the caller)
# until /proc shows none of them (kill -0 -1 cannot tell: it succeeds whenever any other
# process exists), and sets u=1 when it cannot confirm that within about a second. $_ufaas_uid
# is the user's uid, set before.
_KILL_MINE = (
    "_ufaas_i=0; while :; do kill -9 -1 2>/dev/null; _ufaas_left=0; "
    'for _ufaas_p in /proc/[0-9]*; do [ "${_ufaas_p#/proc/}" = "$$" ] && continue; '
    "while read -r _ufaas_k _ufaas_r _ufaas_x; do "
    '[ "$_ufaas_k" = Uid: ] && { [ "$_ufaas_r" = "$_ufaas_uid" ] && _ufaas_left=1; break; }; '
    "done < $_ufaas_p/status 2>/dev/null; done; [ $_ufaas_left = 0 ] && break; "
    "_ufaas_i=$((_ufaas_i + 1)); [ $_ufaas_i -gt 100 ] && { u=1; break; }; sleep 0.01; done"
)
# Empty the places a function may write besides its working directory; u=1 when something
# stays (each rm is a fork, ~0.4 ms: only for what exists).
_WIPE_TEMP = (
    "for f in /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]* /dev/shm/* /dev/shm/.[!.]* "
    "/dev/mqueue/* /dev/mqueue/.[!.]*; do "
    f'{{ [ "$f" != {WORKDIR_ROOT} ] && {{ [ -e "$f" ] || [ -L "$f" ]; }}; }} || continue; '
    'rm -rf "$f" 2>/dev/null || { chmod -R u+rwx "$f"; rm -rf "$f"; } 2>/dev/null; '
    '{ [ -e "$f" ] || [ -L "$f" ]; } && u=1; done'
)
# SysV shared memory, semaphores and message queues outlive their processes, and this shell
# has no way to remove them: any left means the container is replaced (u=1).
_IPC_LEFT = (
    "for q in /proc/sysvipc/shm /proc/sysvipc/sem /proc/sysvipc/msg; do "
    "{ read -r _ufaas_h; read -r _ufaas_l && u=1; } < $q 2>/dev/null; done"
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
# Enter the working directory named by $0, made if new, and refuse one that is not a
# directory of its own (a symlink a function left in its place, say).
_ENTER_WORKDIR = (
    f'cd {WORKDIR_ROOT} && {{ [ -e "$0" ] || [ -L "$0" ] || mkdir -m 0700 -- "$0"; }} && '
    f'cd -P -- "$0" 2>/dev/null && [ "$PWD" = "{WORKDIR_ROOT}/$0" ]'
)
_NOT_OWN = "the working directory is not a directory of its own"
# Output files on the exec path: for each path given after $1 (bytes per file) and $2 (in
# all), a line "F <size> <cut>" and that many bytes, "S" for one that is no longer a plain
# file, "X" once all the room is used. Each is read twice (counted, then sent), at most
# one byte past its share.
_SEND_FILES = (
    f'{_ENTER_WORKDIR} || exit 3; m=$1; r=$2; shift 2; for f; do '
    '[ "$r" -le 0 ] && { echo X; break; }; '
    '{ [ -L "$f" ] || [ ! -f "$f" ]; } && { echo S; continue; }; '
    'n=$m; [ "$r" -lt "$n" ] && n=$r; '
    's=$(head -c $((n + 1)) -- "$f" | wc -c); s=$((s)); t=0; '
    '[ "$s" -gt "$n" ] && { t=1; s=$n; }; echo "F $s $t"; head -c "$s" -- "$f"; '
    'r=$((r - s)); done'
)
_LISTING_CAP = 1 << 20
_CLEAN_UP = f'_ufaas_uid="$0"; u=0; {_KILL_MINE}; {_WIPE_TEMP}; {_IPC_LEFT}; echo $u'


def _limited(job: Job) -> str:
    """The function's command in the exec script: with its limits, in a subshell of its
    own, so that they bind it and not the clean-up after it."""
    limits = []  # CPU seconds, KiB of address space; one per ulimit: dash takes no more
    if job.cpu_limit is not None:
        limits.append(f"ulimit -t {int(job.cpu_limit)}")
    if job.memory_limit is not None:
        limits.append(f"ulimit -v {max(int(job.memory_limit) // 1024, 1)}")
    if not limits:
        return '"$@"'
    return (f'({" && ".join(limits)} || {{ echo "ufaas: the limits could not be set" >&2; '
            'exit 125; }; exec "$@")')


class _MarkedOutput(Output):
    """Output that takes the line ``<marker> <disk_low> <oom> <unclean> <exit code>`` (or
    ``<marker> refused``), written by our script after the function, off the end of stderr.
    The marker is random per run, so a function cannot fake it."""

    def __init__(self, cap: int, on_output: OnOutput | None, marker: bytes) -> None:
        super().__init__(cap, on_output)
        self.pattern = re.compile(
            re.escape(marker) + rb" (?:([01]) ([01]) ([01]) ([0-9]{1,3})|(refused))\n\Z")
        self.disk_low = False
        self.oom = False
        self.unclean = False
        self.refused = False
        self.exit_code: int | None = None  # None: the script did not get to say

    def add(self, fd: int, data: bytes) -> None:
        if fd == 2 and (found := self.pattern.search(data)) is not None:
            if found.group(5):
                self.refused = True
            else:
                self.disk_low, self.oom, self.unclean = (found.group(i) == b"1"
                                                         for i in (1, 2, 3))
                self.exit_code = int(found.group(4))
            data = data[:found.start()]
        super().add(fd, data)


class _FramedFiles(Output):
    """The stdout of ``_SEND_FILES``, kept (up to ``cap``) to be read back once it ends."""

    async def replay(self, names: list[str], files: Collector) -> None:
        data = memoryview(b"".join(self.parts[1]))
        at = 0
        for name in names:
            end = bytes(data[at:at + 64]).find(b"\n")
            if end < 0:
                raise ContainerLost("output files: their stream was cut short")
            line = bytes(data[at:at + end]).split()
            at += end + 1
            if line == [b"X"]:
                files.truncated = True
                return
            if line == [b"S"]:
                continue
            if len(line) != 3 or line[0] != b"F" or not line[1].isdigit():
                raise ContainerLost(f"output files: unexpected {line!r}")
            size = int(line[1])
            if at + size > len(data):
                raise ContainerLost("output files: a file was cut short")
            await files.begin(name, line[2] == b"1")
            for i in range(at, at + size, 1 << 18):
                await files.add(bytes(data[i:min(i + (1 << 18), at + size)]))
            at += size


class ExecRunner:
    """Runs each function as a plain ``docker exec`` as the pool's user (images without
    python3); the container's main process only holds its lifeline.

    Costs two engine calls per function (create, start; an inspect too when our script
    could not report the exit code), plus one to deliver files, against the agent's none.
    """

    def __init__(self, engine: Engine, cid: str, lifeline: MuxStream, user: str,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.cid = cid
        self.user = user
        self.uid = user.partition(":")[0]
        self.alive = False
        self.tainted = False
        self.on_lost = on_lost
        self.drops: list[str] = []
        self._lifeline = lifeline

    async def start(self, nursery: trio.Nursery) -> None:
        code, out, err = await self._exec(["sh", "-c", "id -u"])
        if code != 0 or not out.strip().isdigit():
            raise EngineError(f"container does not run sh: {err[-200:]!r}")
        self.alive = True
        nursery.start_soon(self._watch_lifeline)

    async def _watch_lifeline(self) -> None:
        """The main process ends only with the container: notice at once."""
        try:
            while await self._lifeline.receive() is not None:
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EngineError):
            pass
        finally:
            self.alive = False
            if self.on_lost is not None:
                self.on_lost()

    async def _exec(self, argv: list[str], stdin: bytes = b"",
                    env: dict[str, str] | None = None) -> tuple[int | None, bytes, bytes]:
        output = Output(1 << 20, None)
        code = await self._exec_stream(argv, stdin, env, output)
        return code, b"".join(output.parts[1]), b"".join(output.parts[2])

    async def _exec_stream(self, argv: list[str], stdin: bytes, env: dict[str, str] | None,
                           output: Output, live: Stdin | None = None) -> int | None:
        exec_id = await self.engine.exec_create(self.cid, argv, env=env, user=self.user)
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
    async def _feed(stream: MuxStream, first: bytes, live: Stdin | None) -> None:
        try:
            if first:
                await stream.send(first)
            if live is not None:
                async for chunk in live:
                    await stream.send(chunk)
            await stream.close_stdin()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the function ended, or closed its stdin

    async def _clean_up(self) -> None:
        """Clean up after a function whose own script could not (killed, timed out): the
        container is replaced unless this confirms that nothing of it is left."""
        with trio.move_on_after(KILL_GRACE) as scope:
            code, out, _ = await self._exec(["sh", "-c", _CLEAN_UP, self.uid])
        if scope.cancelled_caught or code != 0 or out.strip() != b"0":
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
            refused = await self._put_files(workdir, job.files)
            if refused:
                return Result("refused", error=refused)
        env = {"UFAAS_WORKDIR": wd, "HOME": wd, "PWD": wd, **job.env}
        # After the function, our script reports on stderr (then taken off it) whether
        # the disk is left nearly full, whether the kernel OOM-killed something meanwhile
        # and whether anything of it is left (the container is replaced then).
        marker = f"ufaas-{uuid.uuid4().hex}"
        # Forgotten workdirs go in the same exec: a separate one would double engine calls.
        drops = "".join(f"rm -rf -- {WORKDIR_ROOT}/{d}; " for d in self.drops)
        self.drops = []
        script = (f"_ufaas_uid={self.uid}; {drops}{_OOM_KILLS}; oom_kills; _ufaas_b=$_ufaas_n; "
                  f"{_ENTER_WORKDIR} || {{ printf '{marker} refused\\n' >&2; exit 126; }}; "
                  f'{_limited(job)}; rc=$?; u=0; {_KILL_MINE}; {_WIPE_TEMP}; {_IPC_LEFT}; '
                  f"d=0; {_DISK_LOW} && d=1; oom_kills; o=0; "
                  '[ "$_ufaas_n" != "$_ufaas_b" ] && o=1; '
                  f"printf '{marker} %s %s %s %s\\n' $d $o $u $rc >&2; exit $rc")
        output = _MarkedOutput(job.output_cap, on_output, marker.encode())
        started = time.monotonic()
        outcome = "exited"
        code: int | None = None
        try:
            with trio.move_on_after(job.timeout) as deadline:
                code = await self._exec_stream(["sh", "-c", script, workdir, *job.argv],
                                               job.stdin or b"", env, output, stdin)
            if deadline.cancelled_caught:
                outcome = "timeout"
                with trio.CancelScope(shield=True):
                    await self._clean_up()
        except BaseException:
            # Cancelled, possibly wrapped in an ExceptionGroup by the stream's nursery.
            with trio.CancelScope(shield=True):
                await self._clean_up()
            raise
        duration = (time.monotonic() - started) * 1000.0
        if output.refused:
            return Result("refused", error=_NOT_OWN)
        result = Result(outcome, duration_ms=round(duration, 3))
        if outcome == "exited":
            if output.exit_code is None:
                # Our script did not get to report (the function killed it): the clean-up
                # it would have done is done now, or the container goes.
                with trio.CancelScope(shield=True):
                    await self._clean_up()
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
        if output.disk_low or output.unclean:
            self.tainted = True
        result.oom = output.oom
        return output.fill(result)

    async def _container_running(self) -> bool:
        try:
            info = await self.engine.inspect(self.cid)
        except EngineError:
            return False
        return bool(info.get("State", {}).get("Running"))

    async def _put_files(self, workdir: str, files: list[File]) -> str | None:
        # Refuse to write through a symlink left by an earlier function in this workdir, or
        # over a directory it left where a file goes.
        parents = sorted({"/".join(f.path.split("/")[:i])
                          for f in files for i in range(1, f.path.count("/") + 1)})
        refuse = "exit 3; fi; "
        checks = "".join(
            f'if [ -L {shlex.quote(p)} ] || {{ [ -e {shlex.quote(p)} ] && '
            f'[ ! -d {shlex.quote(p)} ]; }}; then echo {shlex.quote(p)}: '
            f'not a directory inside the working directory >&2; {refuse}'
            for p in parents
        )
        for f in files:
            path = shlex.quote(f.path)
            checks += (f"if [ -L {path} ]; then rm -f {path}; elif [ -d {path} ]; then "
                       f"echo {path}: is a directory >&2; {refuse}")
        script = (f"umask 077; {_ENTER_WORKDIR} || {{ echo {shlex.quote(_NOT_OWN)} >&2; "
                  f"exit 3; }}; {checks}umask 0; exec tar -xf -")
        code, _, err = await self._exec(["sh", "-c", script, workdir], stdin=tar_files(files))
        if code == 3:
            return err.decode(errors="replace").strip()
        if code != 0:
            raise EngineError(f"could not deliver files (exit {code}): {err[-300:]!r}")
        return None

    async def collect(self, workdir: str, outputs: Outputs, files: Collector) -> None:
        """Two execs: one lists the working directory's files (no symlink followed), and
        after the host has matched them one sends each, cut to its share of the caps."""
        with trio.fail_after(COLLECT_TIMEOUT):
            code, out, err = await self._exec(
                ["sh", "-c", f"{_ENTER_WORKDIR} || exit 3; exec find . -type f -print0",
                 workdir])
            if code == 3:
                raise ContainerLost(f"output files: {_NOT_OWN}")
            listed = out.split(b"\0")
            if len(out) >= _LISTING_CAP:
                files.truncated = True
                listed.pop()  # perhaps cut short
            names = []
            for raw in listed:
                try:
                    name = raw.removeprefix(b"./").decode()
                except UnicodeDecodeError:
                    continue  # the agent leaves out the same
                if name and any(output_matches(name, p) for p in outputs.patterns):
                    names.append(name)
            names.sort()
            if len(names) > outputs.max_count:
                names, files.truncated = names[:outputs.max_count], True
            if not names:
                return
            capped = _FramedFiles(outputs.max_total + 64 * len(names), None)
            code = await self._exec_stream(
                ["sh", "-c", _SEND_FILES, workdir, str(outputs.max_file),
                 str(outputs.max_total), *names], b"", None, capped)
            if code != 0:
                raise ContainerLost(f"output files: sending them failed (exit {code}): "
                                    f"{b''.join(capped.parts[2])[-200:]!r}")
            await capped.replay(names, files)

    def drop(self, workdir: str) -> None:
        self.drops.append(workdir)

    async def aclose(self) -> None:
        self.alive = False
        await self._lifeline.aclose()


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
