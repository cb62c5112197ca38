"""The functions of one server: accepted here, held by id until they end, and each given a
container: a warm one of its pool, or the one of the function it follows. No HTTP here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from pool import File, Place, PoolError, Profile

from .callbacks import Callbacks, pending
from .cluster import AnyLease, AnyPool, AnyPools, ClusterPool
from .config import Config
from .fetch import Downloader, FetchError
from .files import FileStore
from .function import Function, exit_event
from .live import Event, Hub, StdinClosed, Watcher, output_events
from .parser import Parsed, Parser
from .spec import Resource, Spec, SpecError, resource_file
from .store import ACTIVE, Record, Store

log = logging.getLogger("ufaas")

# How long a DELETE waits for its function to be gone before answering.
CANCEL_WAIT = 5.0
# A function its caller waits for (?wait) that starts at once is saved once, when it ends,
# if it ends within this; else it is saved as running within twice this. A server killed
# meanwhile leaves no record of it: its caller, who alone knew of it, got no answer.
PERSIST_AFTER = 0.05


class NotFound(Exception):
    """No function has that id."""


class Conflict(Exception):
    """The request does not fit the function's state (say, PUT once it started)."""


class QueueFull(Exception):
    """Too many functions are pending; try again later."""


@dataclass(frozen=True)
class SchedulerStatistics:
    pending: int  # accepted, not started: the queue
    running: int
    pinned_bytes: int  # spec content that waiting functions keep in memory


class Scheduler:
    """Accepts functions, runs each in its own task, and keeps the unfinished ones by id.

    Run it with ``await nursery.start(scheduler.serve)``: configured pools start, functions
    left pending by an earlier run resume, and cancelling it stops every function (see
    :meth:`Function.run`). Each of ``observers`` is called with every function once it has
    ended and its record is saved.
    """

    def __init__(self, config: Config, store: Store, pools: AnyPools, downloader: Downloader,
                 hub: Hub, parser: Parser, files: FileStore, callbacks: Callbacks) -> None:
        self.config = config
        self.files_store = files
        self.callbacks = callbacks
        self.parser = parser
        self.limits = config.limits()
        self.store = store
        self.pools = pools
        self.downloader = downloader
        self.hub = hub
        self._functions: dict[str, Function] = {}
        self._pending = 0
        self._pinned = 0  # bytes of spec content held by waiting functions
        # Looked up for every function: made once.
        self._profiles = config.profiles()
        self._configured = {(pc.image, pc.network): pc for pc in reversed(config.pools)}
        self._default_profiles = {net: Profile(network=net) for net in (False, True)}
        self._nursery: trio.Nursery | None = None
        # Functions not yet saved (see submit's ``waited``), saved by _persist_late.
        self._unsaved: dict[str, Function] = {}
        self._unsaved_added = trio.Event()
        self.observers: list[Callable[[Function], None]] = []

    async def serve(self, *, task_status: trio.TaskStatus[Scheduler] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            for pc in self.config.pools:
                try:
                    await self.pools.add(pc.image, pc.profile(), configured=True,
                                         **pc.sizes(self.config))
                except PoolError as exc:  # its functions will say so; the rest serve on
                    log.warning("pool %s not started: %s", pc.image, exc)
            self._nursery = nursery
            nursery.start_soon(self._persist_late)
            for record in self.store.recover():
                self._start(Function(record, self.store, self.hub, dequeued=self._dequeued))
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def drain(self, grace: float) -> None:
        """Give running functions up to ``grace`` seconds to finish (graceful shutdown)."""
        with trio.move_on_after(grace):
            for function in list(self._functions.values()):
                if function.status == "running":
                    await function.done.wait()

    # -- requests -------------------------------------------------------------------------

    async def submit(self, raw: bytes | None = None, *, data: object = None,
                     parsed: Parsed | None = None, after: str | None = None,
                     strict: bool = False, interactive: bool = False,
                     waited: bool = False) -> Function:
        """Validate and queue a function; raise BadJSON, SpecError, NotFound, Conflict or
        QueueFull.

        The spec is ``raw`` (its JSON, kept as sent), ``data`` (decoded already) or
        ``parsed`` (validated already). A follow-up (``after``) may leave out the image: it
        takes its predecessor's. An ``interactive`` function reads its spec's stdin, then
        what :meth:`feed` gives it.

        The record is saved before this returns, but with ``waited``: the caller waits
        for the function before it tells anyone its id. Then one that starts at once is
        saved once, when it ends, if that is within ``PERSIST_AFTER``; else it is saved as
        running within twice that. The caller calls :meth:`Function.persist` before it
        tells the id of one that has not ended.
        """
        predecessor = self.get(after) if after is not None else None
        if parsed is None:
            image = predecessor.spec.get("image") if predecessor is not None else None
            parsed = await self.parser.parse(raw, data, image=image)
        spec = _with_image(parsed.spec)
        if predecessor is not None and strict:
            self._check_strict(predecessor, spec)
        lease = (self._claim(spec, predecessor, interactive) if after is None or predecessor
                 else None)
        if lease is None and self._pending >= self.config.queue_limit:
            raise QueueFull(f"{self._pending} functions are pending")
        record = Record(id=str(uuid.uuid4()), spec=spec.summary(), after=after,
                        callback=pending() if spec.callback is not None else None)
        if lease is not None:
            # A warm container was free: the function is accepted as running, in one write.
            Function.started_in(record, lease)
        unsaved = None
        if waited and lease is not None:
            unsaved = (parsed.json, _target(spec))
        else:
            self.store.insert(record, parsed.json, _target(spec))
        # A function that waits keeps its spec in memory only within pending_bytes; the
        # rest wait with theirs on disk, read back when they start.
        pinned = lease is None and self._pin(spec)
        function = Function(record, self.store, self.hub,
                            spec=spec if lease is not None or pinned else None, strict=strict,
                            interactive=interactive, lease=lease, unsaved=unsaved,
                            dequeued=self._dequeued)
        function.pinned = pinned
        self._start(function)
        if not function.saved:
            self._unsaved[function.id] = function
            self._unsaved_added.set()
        return function

    async def update(self, fid: str, raw: bytes) -> Record:
        """PUT: replace the fields ``raw`` (JSON) gives in a pending function's spec."""
        function = self._functions.get(fid)
        record = function.record if function is not None else self.get(fid)
        if function is None or record.status != "pending":
            raise Conflict(f"function {fid} is {record.status}: only pending ones can change")
        old = record.spec
        parsed = await self.parser.parse(self.store.spec(fid) or b"{}", update=raw,
                                         image=old.get("image"))
        spec = _with_image(parsed.spec)
        if function.status != "pending":  # it started while the spec was validated
            raise Conflict(f"function {fid} is {function.status}: only pending ones can "
                           "change")
        moved = (spec.image, spec.network) != (old.get("image"), old.get("network"))
        self._unpin(function)
        function.pinned = self._pin(spec)
        function.record.callback = pending() if spec.callback is not None else None
        function.change(spec if function.pinned else None, spec.summary(), parsed.json,
                        _target(spec), moved=moved)
        return function.record

    def get(self, fid: str) -> Record:
        """The record of ``fid``, with its output so far; raise NotFound."""
        function = self._functions.get(fid)
        if function is not None:
            return function.snapshot()
        record = self.store.get(fid) if _is_uuid(fid) else None
        if record is None:
            raise NotFound(f"no function {fid}")
        return record

    def full_spec(self, fid: str) -> bytes:
        """The spec of ``fid`` as sent (its JSON), content included; raise NotFound."""
        raw = self.store.spec(fid) if _is_uuid(fid) else None
        if raw is None:
            raise NotFound(f"no function {fid}")
        return raw

    def records(self, status: str | None, limit: int, before: str | None = None
                ) -> Iterator[Record]:
        """Records newest first (the active ones, ``all``, or one status), older than
        ``before`` if given, each as :meth:`get` gives it."""
        statuses = ACTIVE if status is None else None if status == "all" else (status,)
        seq = None
        if before is not None:
            seq = self.store.seq(before) if _is_uuid(before) else None
            if seq is None:
                raise NotFound(f"no function {before}")
        for record in self.store.records(statuses, limit, seq):
            function = self._functions.get(record.id)
            yield function.snapshot() if function is not None else record

    async def wait(self, fid: str, timeout: float) -> Record:
        """The record once finished, or as it is after ``timeout`` seconds."""
        function = self._functions.get(fid)
        if function is not None:
            with trio.move_on_after(min(timeout, self.config.max_wait)):
                await function.ended.wait()
            if function.ended.is_set():
                return function.record
        return self.get(fid)

    async def cancel(self, fid: str, *, remove_container: bool = False, purge: bool = False
                     ) -> Record:
        """Stop a function: pending never starts, running is killed; finished stays."""
        function = self._functions.get(fid)
        if function is not None:
            function.cancel(remove_container=remove_container)
            with trio.move_on_after(CANCEL_WAIT):
                await function.done.wait()
        record = self.get(fid)
        if remove_container and function is None and record.container:
            self.pools.discard(record.container)
        if purge and record.finished:
            self.store.delete(fid)
            await self.files_store.remove(fid)
        return record

    def is_active(self, fid: str) -> bool:
        return fid in self._functions

    def statistics(self) -> SchedulerStatistics:
        running = sum(1 for f in self._functions.values() if f.status == "running")
        return SchedulerStatistics(pending=self._pending, running=running,
                                   pinned_bytes=self._pinned)

    def running_pool(self, image: str, network: bool) -> AnyPool | None:
        """The pool that functions of ``image`` and ``network`` run in, if it runs now."""
        return self.pools.get(image, self._profile(image, network))

    async def feed(self, fid: str, data: bytes, eof: bool = False) -> None:
        """Give an interactive function more stdin, or its end-of-file.

        Waits while a lot of its stdin is still unread (it may not have started yet).
        Raise NotFound, or Conflict when the function is not interactive, has had its
        end-of-file or has ended.
        """
        function = self._functions.get(fid)
        if function is None:
            raise Conflict(f"function {fid} is {self.get(fid).status}: its stdin is closed")
        if function.stdin is None:
            raise Conflict(f"function {fid} was not created over a WebSocket: it reads only "
                           "the stdin of its spec")
        try:
            await function.stdin.send(data, eof)
        except StdinClosed as exc:
            raise Conflict(f"function {fid}: {exc}") from None

    def close_stdin(self, fid: str) -> None:
        """End-of-file for an interactive function's stdin, if it is still open."""
        function = self._functions.get(fid)
        if function is not None and function.stdin is not None:
            function.stdin.close()

    def watch(self, fid: str, watcher: Watcher) -> list[Event]:
        """Follow function ``fid`` (``*``: the status of every function); its replay.

        The replay holds its status and output so far (for a finished function, also its
        exit); live events follow with nothing missing or doubled, since taking the replay
        and following happen in one step with no checkpoint. Raise NotFound.
        """
        if fid == "*":
            watcher.follow("*")
            return [{"event": "status", "id": f.id, "status": f.status}
                    for f in self._functions.values()]
        function = self._functions.get(fid)
        if function is not None:
            watcher.follow(fid)
            return function.replay()
        record = self.get(fid)
        replay = [{"event": "status", "id": fid, "status": record.status},
                  *output_events(fid, "stdout", record.stdout),
                  *output_events(fid, "stderr", record.stderr)]
        if record.finished:
            replay.append(exit_event(record))
        return replay

    # -- running (called by Function.run) ---------------------------------------------------

    async def load_spec(self, record: Record) -> Spec:
        """The spec of a function whose spec is not at hand (it waited with it on disk, or
        was resumed after a restart)."""
        parsed = await self.parser.parse(self.full_spec(record.id),
                                         image=record.spec.get("image"))
        return _with_image(parsed.spec)

    async def files(self, spec: Spec) -> list[File]:
        """Every file of the spec: the embedded ones, and the URL ones, fetched at once and
        all within ``queue_timeout`` (each download within ``download_timeout``)."""
        files = spec.files()
        urls = [r for r in spec.resources if r.url is not None]
        if not urls:
            return files
        fetched: dict[int, bytes] = {}
        errors: list[FetchError] = []

        async def fetch(i: int, resource: Resource) -> None:
            try:
                fetched[i] = await self.downloader.fetch(resource.url or "", resource.sha256)
            except FetchError as exc:
                errors.append(exc)
                nursery.cancel_scope.cancel()  # the function cannot run: stop the others

        with trio.move_on_after(self.config.queue_timeout) as deadline:
            async with trio.open_nursery() as nursery:
                for i, resource in enumerate(urls):
                    nursery.start_soon(fetch, i, resource)
        if errors:
            raise errors[0]
        if deadline.cancelled_caught:
            raise FetchError(f"the URL resources were not all fetched within "
                             f"{self.config.queue_timeout:g} s")
        return files + [resource_file(r, fetched[i]) for i, r in enumerate(urls)]

    async def pool_for(self, summary: dict[str, Any]) -> AnyPool:
        """The pool of a spec's image and profile (from its record's summary), started if it
        does not run yet."""
        image, network = summary.get("image") or "", bool(summary.get("network"))
        configured = self._configured.get((image, network))
        if configured is not None:
            return await self.pools.add(image, configured.profile(), configured=True,
                                        **configured.sizes(self.config))
        return await self.pools.add(image, self._profile(image, network))

    async def place_of(self, fid: str) -> Place | None:
        """Where function ``fid`` ran, waiting while it has not started yet."""
        function = self._functions.get(fid)
        if function is not None:
            with trio.move_on_after(self.config.queue_timeout):
                await function.started.wait()  # also set when it ends without starting
        try:
            record = self.get(fid)
        except NotFound:
            return None
        if record.container and record.workdir:
            return Place(record.container, record.workdir, record.node)
        return None

    # -- inside ---------------------------------------------------------------------------

    def _claim(self, spec: Spec, predecessor: Record | None, interactive: bool = False
               ) -> AnyLease | None:
        """A warm container for ``spec`` that is free right now, if there is one and
        nothing else must come first (downloads, a predecessor that has not finished).
        Not a node's for an ``interactive`` function: should that container have gone
        meanwhile, the stdin fed to its run would be lost with it."""
        if self._nursery is None or any(r.url is not None for r in spec.resources):
            return None
        near = None
        if predecessor is not None:
            if not predecessor.finished or not predecessor.container:
                return None
            near = Place(predecessor.container, predecessor.workdir or "", predecessor.node)
        pool = self.running_pool(spec.image or "", spec.network)
        if isinstance(pool, ClusterPool):
            return pool.claim(near, remote=not interactive)
        return pool.claim(near) if pool is not None else None

    def _profile(self, image: str, network: bool) -> Profile:
        return self._profiles.get((image, network)) or self._default_profiles[network]

    def _start(self, function: Function) -> None:
        if self._nursery is None:
            raise RuntimeError("the scheduler is not serving")
        self._functions[function.id] = function
        if function.status == "pending":
            self._pending += 1
        self._nursery.start_soon(self._run, function)
        if function.saved:  # else once it is
            function.announce()

    async def _run(self, function: Function) -> None:
        try:
            await function.run(self)
        finally:
            del self._functions[function.id]
            self._unsaved.pop(function.id, None)
            if function.record.callback is not None:
                self.callbacks.wake()
        if function.record.finished:  # not one left pending by a shutdown
            for observe in self.observers:
                observe(function)

    async def _persist_late(self) -> None:
        """Save each unsaved function that has not ended within PERSIST_AFTER."""
        while True:
            if not self._unsaved:
                self._unsaved_added = trio.Event()
                await self._unsaved_added.wait()
            await trio.sleep(PERSIST_AFTER)
            now = trio.current_time()
            for fid, function in list(self._unsaved.items()):
                if function.saved or now - function.accepted >= PERSIST_AFTER:
                    try:
                        function.persist()
                    except sqlite3.Error as exc:  # the next round tries again
                        log.warning("function %s not saved: %s", fid, exc)
                        continue
                    del self._unsaved[fid]

    def requeued(self, function: Function) -> None:
        """A function accepted as running that never started: it waits again, with its
        spec in memory within pending_bytes, as any other, else on disk (saved as it
        requeues) and read back when it starts."""
        self._pending += 1
        function.pinned = function.spec is not None and self._pin(function.spec)
        if not function.pinned:
            function.spec = None

    def _dequeued(self, function: Function) -> None:
        self._pending -= 1
        self._unpin(function)

    def _pin(self, spec: Spec) -> bool:
        """Whether a waiting function may keep ``spec`` in memory, within pending_bytes
        for all of them; if so, it is counted."""
        size = spec.content_bytes()
        if self._pinned + size > self.config.pending_bytes:
            return False
        self._pinned += size
        return True

    def _unpin(self, function: Function) -> None:
        if function.pinned and function.spec is not None:
            self._pinned -= function.spec.content_bytes()
        function.pinned = False

    def _check_strict(self, predecessor: Record, spec: Spec) -> None:
        """``strict``: the follow-up must be able to run in its predecessor's container."""
        fid = predecessor.id
        if (spec.image, spec.network) != (predecessor.spec.get("image"),
                                          predecessor.spec.get("network")):
            raise Conflict(f"function {fid} ran in another pool ({predecessor.spec.get('image')}"
                           f", network {predecessor.spec.get('network')}): strict needs its "
                           "image and network")
        if not predecessor.container or not self.pools.alive(predecessor.container):
            raise Conflict(f"the container of function {fid} is gone")


def _target(spec: Spec) -> str | None:
    """Where a spec's callback goes, as the store keeps it (JSON), or None."""
    if spec.callback is None:
        return None
    return json.dumps({"url": spec.callback.url, "headers": spec.callback.headers})


def _with_image(spec: Spec | None) -> Spec:
    """The spec, if it names an image (optional in a follow-up, which inherits one)."""
    if spec is None:  # a message without one
        raise SpecError([{"field": "spec", "message": "required"}])
    if spec.image is None:
        raise SpecError([{"field": "image", "message": "required"}])
    return spec


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
