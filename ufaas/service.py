"""The function lifecycle: accept, queue, run in a pool, record. No HTTP here.

:class:`Service` owns the store, the pools and one task per active function, all inside
the nursery of its ``serve()``; the HTTP layer only translates requests into its calls.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

import pool as pool_lib
from pool import Engine, Job, Place, PoolError, Pools, Profile

from .config import Config
from .fetch import Downloader, FetchError
from .live import StdinClosed, StdinPipe, Transcript, Watcher, output_events
from .store import ACTIVE, FINISHED, Record, Store
from .tasks import (
    SpecError,
    TaskSpec,
    embedded_files,
    merge,
    parse_spec,
    parse_update,
    resource_file,
)

log = logging.getLogger("ufaas")


class NotFound(Exception):
    """No function has that id."""


class Conflict(Exception):
    """The request does not fit the function's state (say, PUT once it started)."""


class QueueFull(Exception):
    """Too many functions are pending; try again later."""


@dataclass(eq=False)
class Active:
    """What the service holds for a function that has not finished yet."""

    record: Record
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)
    discard: bool = False
    cancel_requested: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    # The output as sent to watchers, for replays; and live stdin when created interactive.
    transcript: Transcript = field(default_factory=Transcript)
    stdin: StdinPipe | None = None
    spec: TaskSpec | None = None
    requeue: trio.CancelScope | None = None


def _text(parts: list[bytes] | bytes) -> str:
    data = parts if isinstance(parts, bytes) else b"".join(parts)
    return data.decode("utf-8", errors="replace")


class Service:
    """Runs functions in warm pools and keeps their records."""

    def __init__(self, config: Config, *, instance: str | None = None,
                 labels: dict[str, str] | None = None) -> None:
        self.config = config
        self.limits = config.limits()
        self.store = Store(config.db)
        self.engine = Engine(config.docker_host, call_timeout=config.engine_timeout)
        self.pools = Pools(self.engine, home=_home(config.db), instance=instance,
                           labels={**config.labels, **(labels or {})},
                           min_idle=config.min_idle, max=config.max,
                           idle_ttl=config.idle_ttl)
        self.downloader = Downloader(max_bytes=config.download_max_bytes,
                                     timeout=config.download_timeout)
        self._active: dict[str, Active] = {}
        self._pending = 0
        self._nursery: trio.Nursery | None = None
        self._watchers: set[Watcher] = set()

    # -- life -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Start configured pools, resume pending functions, serve until cancelled.

        On cancellation running functions are killed and recorded as cancelled by shutdown;
        pending ones stay pending in the store and run at the next start.
        """
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pools.serve)
                self._nursery = nursery
                for pc in self.config.pools:
                    await self.pools.add(pc.image, pc.profile(), min_idle=pc.min_idle,
                                         max=pc.max, idle_ttl=pc.idle_ttl)
                for record in self.store.recover():
                    self._start(record)
                task_status.started(self)
        finally:
            self._nursery = None
            self.store.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.engine.aclose()

    async def drain(self, grace: float) -> None:
        """Give running functions up to ``grace`` seconds to finish (graceful shutdown)."""
        with trio.move_on_after(grace):
            for active in list(self._active.values()):
                if active.record.status == "running":
                    await active.done.wait()

    async def healthy(self) -> bool:
        return await self.engine.ping()

    # -- requests -------------------------------------------------------------------------

    def create(self, body: object, after: str | None = None, strict: bool = False, *,
               interactive: bool = False) -> Record:
        """Validate and queue a function; raise SpecError, NotFound, Conflict, QueueFull.

        An ``interactive`` function reads its spec's ``stdin``, then what :meth:`feed` gives
        it, until :meth:`feed` sends end-of-file or it ends; any other reads end-of-file
        after its spec's ``stdin``.
        """
        predecessor = None
        if after is not None:
            predecessor = self.get(after)
            if isinstance(body, dict) and "image" not in body:
                body = {**body, "image": predecessor.spec.get("image")}
        spec = _with_image(parse_spec(body, self.limits))
        if predecessor is not None and strict and not self._container_alive(predecessor):
            raise Conflict(f"the container of function {after} is gone")
        if self._pending >= self.config.queue_limit:
            raise QueueFull(f"{self._pending} functions are pending")
        record = Record(id=str(uuid.uuid4()), spec=_dump(spec), after=after)
        # Pydantic's own JSON: several times faster than json.dumps for big embedded files.
        self.store.insert(record, spec.model_dump_json(exclude_none=True))
        self._start(record, strict=strict, interactive=interactive, spec=spec)
        return record

    def update(self, fid: str, body: object) -> Record:
        active = self._active.get(fid)
        record = active.record if active else self.get(fid)
        if record.status != "pending":
            raise Conflict(f"function {fid} is {record.status}: only pending ones can change")
        update = parse_update(body, self.limits)
        old = parse_spec(record.spec, self.limits)
        spec = _with_image(merge(old, update, self.limits))
        record.spec = _dump(spec)
        self.store.save(record, spec=True)
        if active is not None:
            active.spec = spec
            active.changed.set()
            moved = (spec.image, spec.network) != (old.image, old.network)
            if moved and active.requeue is not None:
                active.requeue.cancel()
        return record

    def get(self, fid: str) -> Record:
        active = self._active.get(fid)
        if active is not None:
            record = active.record
            if record.status == "running":
                record.stdout, record.stderr = _text(active.stdout), _text(active.stderr)
            return record
        record = self.store.get(fid) if _is_uuid(fid) else None
        if record is None:
            raise NotFound(f"no function {fid}")
        return record

    def list(self, status: str | None, limit: int) -> list[Record]:
        statuses = ACTIVE if status is None else None if status == "all" else (status,)
        records = self.store.list(statuses, limit)
        return [self._active[r.id].record if r.id in self._active else r for r in records]

    async def wait(self, fid: str, timeout: float) -> Record:
        """The record once finished, or as it is after ``timeout`` seconds."""
        active = self._active.get(fid)
        if active is not None:
            with trio.move_on_after(min(timeout, self.config.max_wait)):
                await active.done.wait()
            if active.done.is_set():
                return active.record  # the saved record, without reading it back
        return self.get(fid)

    async def cancel(self, fid: str, remove_container: bool = False, purge: bool = False
                     ) -> Record:
        """Stop a function: pending never starts, running is killed; finished stays."""
        active = self._active.get(fid)
        if active is not None:
            active.cancel_requested = True
            active.discard = active.discard or remove_container
            active.scope.cancel()
            with trio.move_on_after(5):
                await active.done.wait()
        record = self.get(fid)
        if remove_container and active is None and record.container:
            owner = self.pools.find(record.container)
            if owner is not None:
                owner.discard(record.container)
        if purge and record.finished:
            self.store.delete(fid)
        return record

    def is_active(self, fid: str) -> bool:
        return fid in self._active

    async def feed(self, fid: str, data: bytes, eof: bool = False) -> None:
        """Give an interactive function more stdin, or its end-of-file.

        Waits while a lot of its stdin is still unread (it may not have started yet).
        Raise NotFound, or Conflict when the function is not interactive, has had its
        end-of-file or has ended.
        """
        active = self._active.get(fid)
        if active is None:
            record = self.get(fid)
            raise Conflict(f"function {fid} is {record.status}: its stdin is closed")
        if active.stdin is None:
            raise Conflict(f"function {fid} was not created over a WebSocket: it reads only "
                           "the stdin of its spec")
        try:
            await active.stdin.send(data, eof)
        except StdinClosed as exc:
            raise Conflict(f"function {fid}: {exc}") from None

    def close_stdin(self, fid: str) -> None:
        """End-of-file for an interactive function's stdin, if it is still open."""
        active = self._active.get(fid)
        if active is not None and active.stdin is not None:
            active.stdin.close()

    # -- watching -------------------------------------------------------------------------

    def subscribe(self, **limits: int) -> Watcher:
        """A new :class:`Watcher` that gets the events of what it watches; ``unsubscribe`` it."""
        watcher = Watcher(**{"max_bytes": self.config.stream_buffer, **limits})
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def watch(self, fid: str, watcher: Watcher) -> list[dict[str, Any]]:
        """Follow function ``fid`` (``*``: the status of every function); its replay.

        The replay holds its status and output so far (for a finished function, also its
        exit); live events follow with nothing missing or doubled, since taking the replay
        and following happen in one step with no checkpoint. Raise NotFound.
        """
        if fid == "*":
            watcher.follow("*")
            return [{"event": "status", "id": a.record.id, "status": a.record.status}
                    for a in self._active.values()]
        active = self._active.get(fid)
        if active is not None:
            record = active.record
            # Finished but not yet announced: its final status comes live with its exit.
            status = record.status if not record.finished else (
                "running" if record.started_at else "pending")
            watcher.follow(fid)
            return [{"event": "status", "id": fid, "status": status},
                    *active.transcript.events(fid)]
        record = self.get(fid)
        replay = [{"event": "status", "id": fid, "status": record.status},
                  *output_events(fid, "stdout", record.stdout),
                  *output_events(fid, "stderr", record.stderr)]
        if record.finished:
            replay.append(_exit_event(record))
        return replay

    def watchers(self) -> list[dict[str, Any]]:
        """The statistics of every watcher (one per WebSocket client)."""
        return [vars(w.statistics()) for w in self._watchers]

    def statistics(self) -> list[dict[str, Any]]:
        out = []
        for p in self.pools:
            s = p.statistics()
            out.append({
                "name": s.name, "image": s.image, "mode": s.mode,
                "profile": _profile(p.profile),
                "warm": s.idle, "busy": s.busy, "starting": s.starting, "total": s.total,
                "queued": s.waiting, "min_idle": p.min_idle, "max": p.max,
                "last_error": s.last_error,
            })
        return out

    # -- running --------------------------------------------------------------------------

    def _start(self, record: Record, strict: bool = False, interactive: bool = False,
               spec: TaskSpec | None = None) -> None:
        if self._nursery is None:
            raise RuntimeError("service is not serving")
        active = Active(record, stdin=StdinPipe() if interactive else None, spec=spec)
        self._active[record.id] = active
        self._pending += 1
        self._nursery.start_soon(self._run, active, strict)
        self._publish({"event": "status", "id": record.id, "status": record.status})

    def _container_alive(self, record: Record) -> bool:
        if not record.container:
            return False
        owner = self.pools.find(record.container)
        c = owner.container(record.container) if owner else None
        return c is not None and c.runner.alive

    async def _run(self, active: Active, strict: bool) -> None:
        record = active.record
        try:
            with active.scope:
                await self._execute(active, strict)
            if active.scope.cancelled_caught and not record.finished:
                record.stdout, record.stderr = _text(active.stdout), _text(active.stderr)
                self._finish(record, "cancelled", error=None if active.cancel_requested
                             else "cancelled by server shutdown")
        except Exception as exc:  # a bug must end one function, not the server
            log.exception("function %s failed inside ufaas", record.id)
            self._finish(record, "error", error=f"internal error: {exc}")
        finally:
            if record.status == "pending":
                self._pending -= 1
            if not record.finished:
                # Cancelled by shutdown before it ran: stays pending for the next start.
                if record.status == "running":
                    self._finish(record, "cancelled", error="cancelled by server shutdown")
            self._active.pop(record.id, None)
            if active.stdin is not None:
                active.stdin.close()
            active.started.set()
            active.done.set()
            for stream, text in active.transcript.close():
                self._publish({"event": stream, "id": record.id, "data": text})
            self._publish({"event": "status", "id": record.id, "status": record.status})
            self._publish(_exit_event(record))

    async def _execute(self, active: Active, strict: bool) -> None:
        record = active.record
        near = await self._place_of(record.after) if record.after else None
        while True:
            # Validated when accepted (and on PUT): re-parsing only what came from the store.
            spec = active.spec if active.spec is not None else parse_spec(record.spec,
                                                                          self.limits)
            try:
                files = await self._files(spec)
            except FetchError as exc:
                self._finish(record, "error", error=str(exc))
                return
            profile = self._profile_for(spec)
            try:
                pool = await self.pools.add(spec.image or "", profile)
            except PoolError as exc:
                self._finish(record, "error", error=str(exc))
                return
            changed = active.changed = trio.Event()
            # A PUT that moves it to another pool cancels this scope to re-queue it there.
            with trio.CancelScope() as active.requeue:
                try:
                    with trio.move_on_after(self.config.queue_timeout) as waited:
                        async with pool.lease(near, strict=strict) as lease:
                            if changed.is_set():
                                continue  # PUT while queued: start over with the new spec
                            await self._run_leased(active, lease, spec, files)
                            return
                    if waited.cancelled_caught:
                        self._finish(record, "error", error="no container became free "
                                     f"within {self.config.queue_timeout:g} s")
                        return
                except PoolError as exc:
                    self._finish(record, "error", error=str(exc))
                    return
            active.requeue = None

    async def _run_leased(self, active: Active, lease: pool_lib.Lease, spec: TaskSpec,
                          files: list[pool_lib.File]) -> None:
        record = active.record
        record.status = "running"
        self._pending -= 1
        record.started_at = time.time()
        record.container = lease.container.id
        record.workdir = lease.workdir
        record.locality = None if lease.hit is None else ("hit" if lease.hit else "miss")
        self.store.save(record)
        active.started.set()
        self._publish({"event": "status", "id": record.id, "status": "running"})
        job = Job(spec.argv(), files=files, env=dict(spec.env),
                  stdin=spec.stdin.encode() if spec.stdin is not None else None,
                  timeout=float(spec.timeout or self.config.default_timeout),
                  output_cap=self.config.output_cap, id=record.id)

        def on_output(fd: int, data: bytes) -> None:
            (active.stdout if fd == 1 else active.stderr).append(data)
            for stream, text in active.transcript.add(fd, data):
                self._publish({"event": stream, "id": record.id, "data": text})

        try:
            result = await lease.run(job, on_output, active.stdin)
        finally:
            lease.discard = active.discard
        record.stdout, record.stderr = _text(result.stdout), _text(result.stderr)
        record.truncated = result.truncated
        record.exit_code, record.signal, record.oom = result.exit_code, result.signal, result.oom
        record.duration_ms = result.duration_ms
        if result.outcome == "exited":
            status = "succeeded" if result.exit_code == 0 else "failed"
            error = ("out of memory: the function went past its memory limit"
                     if result.oom else None)
            self._finish(record, status, error=error)
        elif result.outcome == "refused":
            self._finish(record, "error", error=f"refused: {result.error}")
        else:
            self._finish(record, result.outcome, error=result.error)

    async def _place_of(self, fid: str) -> Place | None:
        """Where function ``fid`` ran, waiting while it has not started yet."""
        active = self._active.get(fid)
        if active is not None:
            with trio.move_on_after(self.config.queue_timeout):
                await active.started.wait()  # also set when it ends without starting
        try:
            record = self.get(fid)
        except NotFound:
            return None
        if record.container and record.workdir:
            return Place(record.container, record.workdir)
        return None

    async def _files(self, spec: TaskSpec) -> list[pool_lib.File]:
        files = embedded_files(spec)
        for resource in spec.resources:
            if resource.url is not None:
                data = await self.downloader.fetch(resource.url, resource.sha256)
                files.append(resource_file(resource, data))
        return files

    def _profile_for(self, spec: TaskSpec) -> Profile:
        for pc in self.config.pools:
            if pc.image == spec.image and pc.network == spec.network:
                return pc.profile()
        return Profile(network=spec.network)

    def _finish(self, record: Record, status: str, *, error: str | None = None) -> None:
        if record.status == "pending":
            self._pending -= 1
        record.status = status
        record.error = error
        record.finished_at = time.time()
        self.store.save(record)

    def _publish(self, event: dict[str, Any]) -> None:
        for watcher in self._watchers:
            watcher.offer(event)


def _with_image(spec: TaskSpec) -> TaskSpec:
    """The spec, if it names an image (optional in a follow-up, which inherits one)."""
    if spec.image is None:
        raise SpecError([{"field": "image", "message": "required"}])
    return spec


def _exit_event(record: Record) -> dict[str, Any]:
    return {"event": "exit", "id": record.id, "status": record.status,
            "exit_code": record.exit_code, "signal": record.signal, "error": record.error}


def _dump(spec: TaskSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True)


def _profile(p: Profile) -> dict[str, Any]:
    return {"memory": p.memory, "cpus": p.cpus, "pids": p.pids, "network": p.network,
            "user": p.user, "workdir_size": p.workdir_size}


def _home(db: str) -> str:
    return hashlib.sha256(str(db).encode()).hexdigest()[:16]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


__all__ = ["Conflict", "FINISHED", "NotFound", "QueueFull", "Service", "SpecError"]
