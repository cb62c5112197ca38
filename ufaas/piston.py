"""A Piston-compatible API (v2), so that Piston's clients run their code on ufaas unchanged.

Each stage is a function on the usual path: the compile stage when the runtime has one, then
the run, a strict follow-up of it in the same working directory. Runtimes come from the
config; requests are checked, and answers and errors shaped, as Piston does it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import signal as signals
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Blueprint, Response, request, websocket
from semantic_version import NpmSpec, Version
from werkzeug.exceptions import HTTPException

from pool import Profile

from .config import Config, RuntimeConfig
from .function import Function
from .openapi import PistonExecute, PistonMessage, PistonResult, PistonRuntime, documented
from .scheduler import Conflict, NotFound, QueueFull, Scheduler
from .spec import BadJSON, SpecError
from .store import Record

PISTON_PREFIX = "/api/v2"
STAGES = ("compile", "run")
# What Piston names signals by (its globals.js).
SIGNALS = {
    **{s.value: s.name for s in signals.Signals if s.value < 32},
    **{n: f"SIGRTMIN+{n - 34}" if n > 34 else "SIGRTMIN" for n in range(34, 50)},
    **{n: f"SIGRTMAX-{64 - n}" if n < 64 else "SIGRTMAX" for n in range(50, 65)},
}
ENCODINGS = ("utf8", "base64", "hex")
# Seconds a WebSocket client has to send its init message (Piston's 1 s).
INIT_TIMEOUT = 1.0
# Beyond a stage's own timeout and the wait for a container, how long its answer may take.
STAGE_GRACE = 30.0
MAX_MESSAGE = 1 << 20


class PistonError(Exception):
    """A request Piston would refuse: 400 ``{"message": ...}``."""


@dataclass(frozen=True)
class Runtime:
    language: str
    version: Version
    raw_version: str
    aliases: tuple[str, ...]
    runtime: str | None
    image: str
    run: tuple[str, ...]
    compile: tuple[str, ...] | None
    env: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, rc: RuntimeConfig) -> Runtime:
        return cls(rc.language, Version.coerce(rc.version), rc.version, tuple(rc.aliases),
                   rc.runtime, rc.image, tuple(rc.run),
                   tuple(rc.compile) if rc.compile else None, tuple(rc.env.items()))

    def names(self, language: str) -> bool:
        return language == self.language or language in self.aliases

    def listing(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"language": self.language, "version": self.raw_version,
                                 "aliases": list(self.aliases)}
        if self.runtime is not None:
            shown["runtime"] = self.runtime
        return shown


@dataclass
class Limits:
    """A stage's: seconds of wall time, CPU seconds, bytes (None: the profile's)."""

    timeout: float
    cpu: int
    memory: int | None


@dataclass
class Job:
    """An execute request, checked: what each of its stages runs."""

    runtime: Runtime
    resources: list[dict[str, Any]]
    code_files: list[str]
    args: list[str]
    stdin: str
    limits: dict[str, Limits] = field(default_factory=dict)

    def spec(self, stage: str, *, first: bool, interactive: bool) -> dict[str, Any]:
        """The function spec of ``stage``; the first stage brings the files, a later one
        finds them in the working directory it follows."""
        rt, limits = self.runtime, self.limits[stage]
        if stage == "compile":
            command = _expand(rt.compile or (), self.code_files, append_files=True)
        else:
            command = _expand(rt.run, self.code_files, append_files=False) + self.args
        spec: dict[str, Any] = {"command": command, "env": dict(rt.env),
                                "timeout": limits.timeout, "cpu_limit": limits.cpu}
        if limits.memory is not None:
            spec["memory_limit"] = limits.memory
        if first:
            spec.update(image=rt.image, resources=self.resources)
        if stage == "run" and not interactive:
            spec["stdin"] = self.stdin
        return spec


def _expand(template: tuple[str, ...], files: list[str], *, append_files: bool) -> list[str]:
    """``{files}`` becomes every code file, ``{file}`` the first; a compile step with
    neither gets the files as its arguments, as Piston's do."""
    out: list[str] = []
    placed = False
    for word in template:
        if word == "{files}":
            out += files
            placed = True
        elif "{file}" in word:
            out.append(word.replace("{file}", files[0]))
            placed = True
        else:
            out.append(word)
    return out + files if append_files and not placed else out


def _falsy(value: Any) -> bool:
    """Whether JavaScript, which Piston is written in, reads ``value`` (from JSON) as false:
    Python also does for ``[]`` and ``{}``, which Piston refuses as limits."""
    return value is None or value is False or value == "" or (
        isinstance(value, int | float) and value == 0)


@functools.lru_cache(maxsize=256)  # clients ask for the same few ranges again and again
def _version_range(text: str) -> NpmSpec | None:
    try:
        return NpmSpec(text[:100])
    except ValueError:
        return None


class Runtimes:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtimes = [Runtime.of(rc) for rc in config.runtimes]
        self._profiles = config.profiles()

    def listing(self) -> list[dict[str, Any]]:
        return [rt.listing() for rt in self.runtimes]

    def find(self, language: str, version: str) -> Runtime | None:
        """The latest runtime of ``language`` (or an alias) whose version ``version`` (a
        semver range, as npm reads them) admits."""
        wanted = _version_range(version)
        if wanted is None:
            return None
        found = [rt for rt in self.runtimes if rt.names(language) and rt.version in wanted]
        return max(found, key=lambda rt: rt.version, default=None)

    def job(self, body: Any) -> Job:
        """Check an execute request as Piston checks it; raise PistonError."""
        if not isinstance(body, dict):
            raise PistonError("the request body must be a JSON object")
        language, version, files = body.get("language"), body.get("version"), body.get("files")
        if not language or not isinstance(language, str):
            raise PistonError("language is required as a string")
        if not version or not isinstance(version, str):
            raise PistonError("version is required as a string")
        if not isinstance(files, list):
            raise PistonError("files is required as an array")
        for i, f in enumerate(files):
            if not isinstance(f, dict) or not isinstance(f.get("content"), str):
                raise PistonError(f"files[{i}].content is required as a string")
        rt = self.find(language, version)
        if rt is None:
            raise PistonError(f"{language}-{version} runtime is unknown")
        resources, code_files = self._files(files)
        args, stdin = body.get("args"), body.get("stdin")
        if args is None:
            args = []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise PistonError("args must be an array of strings")
        if stdin is None:
            stdin = ""
        if not isinstance(stdin, str):
            raise PistonError("stdin must be a string")
        if not stdin.endswith("\n"):  # as Piston gives it
            stdin += "\n"
        job = Job(rt, resources, code_files, args, stdin)
        for stage in STAGES:
            job.limits[stage] = self._limits(body, stage, rt)
        return job

    def _files(self, files: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        if len(files) > self.config.max_resources:
            raise PistonError(f"at most {self.config.max_resources} files")
        resources, code_files = [], []
        for i, f in enumerate(files):
            name = f.get("name")
            if _falsy(name):
                name = f"file{i}.code"
            elif not isinstance(name, str):
                raise PistonError(f"files[{i}].name must be a string")
            encoding = f.get("encoding") if f.get("encoding") in ENCODINGS else "utf8"
            content = f["content"]
            if encoding == "utf8":
                resources.append({"path": name, "text": content})
                code_files.append(name)
                continue
            try:
                data = (base64.b64decode(content, validate=True) if encoding == "base64"
                        else bytes.fromhex(content))
            except (binascii.Error, ValueError):
                raise PistonError(f"files[{i}].content is not valid {encoding}") from None
            resources.append({"path": name, "base64": base64.b64encode(data).decode()})
        if not code_files:
            raise PistonError("files must include at least one utf8 encoded file")
        return resources, code_files

    def _limits(self, body: dict[str, Any], stage: str, rt: Runtime) -> Limits:
        c = self.config
        most = {"timeout": (c.piston_compile_timeout if stage == "compile"
                            else c.piston_run_timeout) * 1000,
                "cpu_time": (c.piston_compile_cpu_time if stage == "compile"
                             else c.piston_run_cpu_time) * 1000,
                "memory_limit": self._profiles.get((rt.image, False), Profile()).memory}
        got: dict[str, float] = {}
        for constraint, limit in most.items():
            name = f"{stage}_{constraint}"
            value = body.get(name)
            if _falsy(value):
                got[constraint] = limit
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise PistonError(f"If specified, {name} must be a number")
            if constraint == "memory_limit" and value == -1:  # Piston's "no limit"
                got[constraint] = limit
                continue
            if value > limit:
                shown = int(limit) if limit == int(limit) else limit  # as JavaScript prints it
                raise PistonError(f"{name} cannot exceed the configured limit of {shown}")
            if value < 0:
                raise PistonError(f"{name} must be non-negative")
            if constraint == "memory_limit" and value < 1 << 20:
                raise PistonError(f"{name} must be at least 1048576 (1 MiB)")
            got[constraint] = value
        memory = int(got["memory_limit"])
        return Limits(timeout=got["timeout"] / 1000, cpu=max(math.ceil(got["cpu_time"] / 1000), 1),
                      memory=None if memory >= most["memory_limit"] else memory)


# -- answers ------------------------------------------------------------------------------

def stage_result(function: Function, limits: Limits, output_cap: int) -> dict[str, Any]:
    """A stage's answer as Piston gives it, from the function's record and transcript."""
    r: Record = function.record
    code, signal = r.exit_code, SIGNALS.get(r.signal) if r.signal else None
    status, message = None, None
    if r.status == "error":
        status, message = "XX", r.error
    elif r.status == "timeout":
        status, message, code, signal = "TO", "Time limit exceeded (wall clock)", None, "SIGKILL"
    elif r.status == "cancelled":  # a signal message: it was killed
        status, message, code, signal = "SG", "Caught fatal signal 9", None, "SIGKILL"
    elif r.signal in (signals.SIGKILL, signals.SIGXCPU) and limits.cpu * 950 <= (
            # Plain exec measures no CPU time: there, the time it ran stands for it.
            r.cpu_ms if r.cpu_ms is not None else r.duration_ms or 0):
        status, message = "TO", "Time limit exceeded"
    elif r.truncated:
        over = len(r.stdout.encode()) >= output_cap
        status = "OL" if over else "EL"
        message = "stdout length exceeded" if over else "stderr length exceeded"
    elif r.signal:
        status, message = "SG", f"Caught fatal signal {r.signal}"
    elif code:
        status, message = "RE", f"Exited with error status {code}"
    return {
        "stdout": r.stdout, "stderr": r.stderr,
        # Both streams in the order they were read.
        "output": "".join(text for _, text in function.transcript.parts),
        "code": None if signal else code, "signal": signal, "message": message,
        "status": status, "cpu_time": r.cpu_ms, "wall_time": r.duration_ms,
        "memory": r.max_rss,
    }


def succeeded(result: dict[str, Any]) -> bool:
    return result["code"] == 0 and result["status"] is None


# -- the routes -------------------------------------------------------------------------

def piston_api(scheduler: Scheduler, config: Config,
               read_body: Callable[[], Awaitable[bytes]]) -> Blueprint:
    """The blueprint; ``read_body`` reads a request's body as every route of the app does
    (and says so, so that the connection stays open)."""
    runtimes = Runtimes(config)
    api = Blueprint("piston", __name__, url_prefix=PISTON_PREFIX)

    async def run_stage(job: Job, stage: str, after: str | None,
                        interactive: bool = False) -> Function:
        spec = job.spec(stage, first=after is None, interactive=interactive)
        return await scheduler.submit(data=spec, after=after, strict=after is not None,
                                      interactive=interactive)

    async def finished(function: Function, limits: Limits) -> None:
        with trio.move_on_after(config.queue_timeout + limits.timeout + STAGE_GRACE):
            await function.done.wait()
        if not function.done.is_set():
            await scheduler.cancel(function.id)

    async def execute(job: Job) -> dict[str, Any]:
        answer: dict[str, Any] = {"language": job.runtime.language,
                                  "version": job.runtime.raw_version}
        after = None
        for stage in STAGES:
            if stage == "compile" and job.runtime.compile is None:
                continue
            function = await run_stage(job, stage, after)
            await finished(function, job.limits[stage])
            answer[stage] = stage_result(function, job.limits[stage], config.output_cap)
            if stage == "compile" and not succeeded(answer[stage]):
                answer["run"] = answer[stage]  # as Piston answers a failed compile
                break
            after = function.id
        return answer

    @api.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return _reply({"message": exc.description or exc.name}, exc.code or 500)

    @api.get("/runtimes")
    @documented(piston=True, answers={200: (list[PistonRuntime], "the runtimes configured")})
    async def list_runtimes() -> Response:
        """Piston: the runtimes."""
        return _reply(runtimes.listing())

    @api.post("/execute")
    @documented(piston=True, body=PistonExecute, answers={
        200: (PistonResult, "every stage ran (whatever their status)"),
        400: (PistonMessage, "refused, as Piston refuses it: the message says why"),
        413: (PistonMessage, "the body is over max_body"),
        415: (PistonMessage, "the body is not of type application/json"),
        429: (PistonMessage, "too many functions are pending")})
    async def execute_route() -> Response:
        """Piston: run code, its compile stage first when the runtime has one."""
        if not request.mimetype == "application/json":
            return _reply({"message": "requests must be of type application/json"}, 415)
        data = await read_body()
        try:
            job = runtimes.job(json.loads(data))
            return _reply(await execute(job))
        except (ValueError, RecursionError):
            return _reply({"message": "the request body is not valid JSON"}, 400)
        except PistonError as exc:
            return _reply({"message": str(exc)}, 400)
        except SpecError as exc:
            return _reply({"message": exc.message}, 400)
        except QueueFull as exc:
            return _reply({"message": f"queue full: {exc}"}, 429)
        except (BadJSON, NotFound, Conflict) as exc:
            return _reply({"message": str(exc)}, 400)

    @api.websocket("/connect")
    async def connect() -> None:
        await websocket.accept()
        await Connection(scheduler, runtimes, run_stage, config, websocket.send).serve(
            websocket.receive, websocket.close)

    return api


def _reply(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


class Connection:
    """One client of ``/api/v2/connect``: an init, then stdin and signals while its stages
    run, their output sent as it comes; closed with Piston's codes."""

    def __init__(self, scheduler: Scheduler, runtimes: Runtimes,
                 run_stage: Callable[..., Awaitable[Function]], config: Config,
                 send: Callable[[str], Awaitable[None]]) -> None:
        self.scheduler, self.runtimes, self.config = scheduler, runtimes, config
        self.run_stage, self.send = run_stage, send
        self.current: Function | None = None
        self.refusal: tuple[int, str] | None = None  # a protocol error's close code

    async def serve(self, receive: Callable[[], Awaitable[str | bytes]],
                    close: Callable[[int, str], Awaitable[None]]) -> None:
        first = None
        with trio.move_on_after(INIT_TIMEOUT):
            first = await receive()
        if first is None:
            return await close(4001, "Initialization Timeout")
        try:
            message = _message(first)
            if message.get("type") != "init":
                return await close(4003, "Not yet initialized")
            job = self.runtimes.job(message)
        except (ValueError, PistonError) as exc:
            await self._error(str(exc))
            return await close(4002, "Notified Error")
        await self.send(json.dumps({"type": "runtime", "language": job.runtime.language,
                                    "version": job.runtime.raw_version}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, receive, nursery.cancel_scope)
            await self._run(job)
            nursery.cancel_scope.cancel()
        if self.refusal is not None:
            if self.current is not None:
                with trio.CancelScope(shield=True):
                    await self.scheduler.cancel(self.current.id)
            return await close(*self.refusal)
        await close(4999, "Job Completed")

    async def _error(self, message: str) -> None:
        await self.send(json.dumps({"type": "error", "message": message}))

    async def _read(self, receive: Callable[[], Awaitable[str | bytes]],
                    scope: trio.CancelScope) -> None:
        """Stdin and signals for the stage that runs; a protocol error ends it all."""
        async with trio.open_nursery() as nursery:
            while self.refusal is None:
                try:
                    message = _message(await receive())
                except ValueError as exc:
                    await self._error(str(exc))
                    self.refusal = (4002, "Notified Error")
                    break
                kind = message.get("type")
                if kind == "init":
                    self.refusal = (4000, "Already Initialized")
                elif kind == "data":
                    if message.get("stream") != "stdin" or not isinstance(message.get("data"),
                                                                          str):
                        self.refusal = (4004, "Can only write to stdin")
                    elif self.current is not None:
                        try:
                            await self.scheduler.feed(self.current.id, message["data"].encode())
                        except (NotFound, Conflict):
                            pass  # that stage is over: Piston drops it too
                elif kind == "signal":
                    if message.get("signal") not in SIGNALS.values():
                        self.refusal = (4005, "Invalid signal")
                    elif self.current is not None:  # any signal ends it, as SIGKILL does
                        nursery.start_soon(self.scheduler.cancel, self.current.id)
        scope.cancel()

    async def _run(self, job: Job) -> None:
        watcher = self.scheduler.hub.subscribe()
        try:
            after = None
            for stage in STAGES:
                if stage == "compile" and job.runtime.compile is None:
                    continue
                await self.send(json.dumps({"type": "stage", "stage": stage}))
                try:
                    function = await self.run_stage(job, stage, after, interactive=True)
                except (SpecError, QueueFull, Conflict, NotFound) as exc:
                    await self._error(exc.message if isinstance(exc, SpecError) else str(exc))
                    return
                self.current = function
                watcher.reply(self.scheduler.watch(function.id, watcher))
                limits = job.limits[stage]
                with trio.move_on_after(self.config.queue_timeout + limits.timeout
                                        + STAGE_GRACE) as late:
                    await self._forward(watcher, function)
                if late.cancelled_caught:  # cancelled now, its end follows at once
                    await self.scheduler.cancel(function.id)
                    await function.done.wait()
                result = stage_result(function, limits, self.config.output_cap)
                await self.send(json.dumps({"type": "exit", "stage": stage,
                                            "code": result["code"], "signal": result["signal"]}))
                self.current = None
                if stage == "compile" and not succeeded(result):
                    return
                after = function.id
        finally:
            self.scheduler.hub.unsubscribe(watcher)

    async def _forward(self, watcher: Any, function: Function) -> None:
        """The stage's output as data messages, until its exit (its last event)."""
        while True:
            for event in await watcher.receive():
                if event.get("id") != function.id:
                    continue
                if event["event"] in ("stdout", "stderr"):
                    await self.send(json.dumps({"type": "data", "stream": event["event"],
                                                "data": event["data"]}))
                elif event["event"] == "exit":
                    return
                elif event.get("missed"):  # this client read too slowly: the rest is lost
                    await self._error(event["message"])
                    await function.done.wait()
                    return


def _message(raw: str | bytes) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE:
        raise ValueError(f"a message is at most {MAX_MESSAGE} bytes")
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("a message must be JSON") from None
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message
