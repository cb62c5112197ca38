"""Warm container pools: one per image and profile, filled and reaped in the background.

A :class:`Pool` owns its containers for their whole life: its ``serve()`` nursery starts
them, watches them, hands them out as leases, and removes every one of them on the way out.
:class:`Pools` owns the pools of one server instance and creates a pool on first use.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ._docker import CannotStart, Engine, EngineError, ImageMissing
from ._runner import (
    AGENT_CAPABILITIES,
    LIFELINE,
    WORKDIR_ROOT,
    AgentRunner,
    Collector,
    ContainerLost,
    ExecRunner,
    NoAgent,
    OnFile,
    OnOutput,
    Stdin,
    agent_argv,
)
from ._types import Job, Place, Profile, Result

log = logging.getLogger("pool")

DEFAULT_MIN_IDLE = 1
DEFAULT_MAX = 4
DEFAULT_IDLE_TTL = 300.0
DEFAULT_WATCH_INTERVAL = 2.0
DEFAULT_WORKDIRS_KEPT = 16
DEFAULT_MAX_CONTAINERS = 32
CLEANUP_TIMEOUT = 15.0
# A container of any ufaas instance still "created" (never started) this long after its
# creation was left by an instance killed between the two calls: no process of its own
# will ever end it, so whichever instance sees it removes it (see Pools.remove_unstarted).
UNSTARTED_GRACE = 60.0
# Failed starts are retried ever later, up to this (an image removed behind our back, say).
_BACKOFF_MAX = 60.0
# How long an image name keeps the ID it was resolved to: a tag built again is seen then.
IMAGE_ID_TTL = 60.0


class PoolError(Exception):
    """No container could be had for a lease (image missing, engine failing)."""


class PoolClosed(PoolError):
    """The pool is shutting down."""


class LeaseTimeout(PoolError):
    """No container became free within the lease's timeout."""


@dataclass(eq=False)
class Container:
    id: str
    runner: AgentRunner | ExecRunner
    state: str = "idle"  # idle | busy | dead
    last_used: float = field(default_factory=time.monotonic)
    uses: int = 0
    # Working directories kept for locality follow-ups, oldest first.
    workdirs: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    # Leases waiting for this very container (locality), first come first served.
    waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    discarded: bool = False  # asked to go while busy: retired when its lease ends

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(eq=False)
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    container: Container | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class PoolStatistics:
    image: str
    name: str
    mode: str | None
    idle: int
    busy: int
    starting: int
    total: int
    waiting: int
    started: int
    failed_starts: int  # in a row, since the last start that worked
    last_error: str | None
    # Totals since the pool began: starts that failed, and containers taken out of service
    # by reason (see RETIRE_REASONS).
    start_failures: int = 0
    retired: dict[str, int] = field(default_factory=dict)
    # Agent pools of a profile with a zygote: how many containers have theirs ready, the
    # preload modules that failed to import (and why), the last zygote error, and the
    # memory of one zygote.
    zygote: dict[str, Any] | None = None


# Why a container is taken out of service: it died or left the engine (lost), its clean-up
# could not be confirmed or its disk filled (unclean), a caller asked (discarded), it was
# idle past idle_ttl (idle), another pool needed its room (budget), the pool closed (closed).
RETIRE_REASONS = ("lost", "unclean", "discarded", "idle", "budget", "closed")


class Lease:
    """One container, held by one caller until the ``lease()`` block ends.

    ``hit`` is True when a locality request got the container it asked for, False when it
    did not, and None when no locality was asked for.
    """

    def __init__(self, pool: Pool, container: Container, workdir: str, hit: bool | None):
        self.pool = pool
        self.container = container
        self.workdir = workdir
        self.hit = hit
        self.discard = False
        self._ran = False
        self._released = False

    @property
    def place(self) -> Place:
        return Place(self.container.id, self.workdir, self.pool.node)

    def release(self) -> None:
        """Give the container back (or have it replaced when ``discard`` or tainted); only
        the first call counts. The ``lease()`` block calls it; a claimed lease's holder must."""
        if not self._released:
            self._released = True
            self.pool._release(self.container, discard=self.discard)

    async def run(self, job: Job, on_output: OnOutput | None = None,
                  stdin: Stdin | None = None, on_file: OnFile | None = None) -> Result:
        """Run ``job`` in the leased container; ``on_output(fd, data)`` sees output live.

        Without ``stdin`` the function reads ``job.stdin`` then end-of-file. With it (a
        receive channel of bytes) it reads ``job.stdin``, then each chunk as it arrives,
        and end-of-file once the channel ends or is closed; the run stops reading the
        channel when the function ends.

        On cancellation the function's processes are killed (the wait for that is
        shielded and bounded) before Cancelled propagates.

        With ``job.outputs``, the files they name are collected once the function has
        ended, however it ended (a timed-out function's partial files too), into
        ``result.files``: their bytes go to ``on_file(path, chunk)`` as they come, or
        without it into each file's ``data``. A collection that fails leaves the files
        got so far, ``files_truncated`` and ``files_error``.
        """
        if self._ran:
            raise RuntimeError("a lease runs one function")
        self._ran = True
        runner = self.container.runner
        # Known from the start, so a follow-up queued meanwhile waits for this container.
        self.container.workdirs[self.workdir] = None
        self.container.workdirs.move_to_end(self.workdir)
        try:
            result = await runner.run(job, self.workdir, on_output, stdin)
        except (ContainerLost, EngineError) as exc:
            runner.tainted = True
            result = Result("error", error=f"container failed: {exc}")
        if job.outputs is not None and result.outcome != "refused" and runner.alive:
            files = Collector(on_file)
            try:
                await runner.collect(self.workdir, job.outputs, files)
            except (ContainerLost, EngineError) as exc:
                runner.tainted = True
                files.truncated = True
                result.files_error = str(exc)
            files.done(result)
        if not runner.alive:
            result.error = result.error or "container stopped"
        result.place = self.place
        return result


class Budget:
    """A cap on the containers of several pools together: a pool that needs one more when
    the cap is reached makes room by retiring an idle container of another pool."""

    def __init__(self, limit: int, pools: Callable[[], Iterable[Pool]]) -> None:
        self.limit = limit
        self._pools = pools

    def room(self) -> int:
        return self.limit - sum(p.size() for p in self._pools())

    def make_room(self, asking: Pool) -> bool:
        """Retire one idle container of another pool (the least recently used one beyond
        its pool's ``min_idle``, else one of a pool not configured); True if one went."""
        candidates = []
        for pool in self._pools():
            if pool is asking:
                continue
            spare = len(pool._idle) - (pool.min_idle if pool.configured else 0)
            candidates += [(c.last_used, c, pool) for c in list(pool._idle)[:max(spare, 0)]]
        if not candidates:
            return False
        _, container, pool = min(candidates, key=lambda item: item[0])
        pool._retire(container, "budget")
        return True

    def freed(self) -> None:
        """A container went: pools waiting for room may start one now."""
        for pool in self._pools():
            if pool._waiters:
                pool._wake.set()


class Pool:
    """Warm containers of one image and profile.

    Keeps ``min_idle`` containers ready, grows to ``max`` under load, and removes idle
    containers beyond ``min_idle`` after ``idle_ttl`` seconds. Run it with
    ``await nursery.start(pool.serve)``; everything it created is removed when ``serve``
    ends, however it ends.
    """

    def __init__(
        self,
        engine: Engine,
        image: str,
        profile: Profile | None = None,
        *,
        name: str | None = None,
        instance: str = "",
        labels: Mapping[str, str] | None = None,
        min_idle: int = DEFAULT_MIN_IDLE,
        max: int = DEFAULT_MAX,
        idle_ttl: float = DEFAULT_IDLE_TTL,
        watch_interval: float = DEFAULT_WATCH_INTERVAL,
        workdirs_kept: int = DEFAULT_WORKDIRS_KEPT,
        budget: Budget | None = None,
        configured: bool = True,
        reference: str | None = None,
        node: str | None = None,
    ) -> None:
        """``budget`` caps this pool's containers together with other pools'; a pool not
        ``configured`` gives up its containers first when room is needed. ``reference``
        is how the image was named (``image`` may be its ID). ``node`` names the machine,
        in a cluster: the places of its leases carry it."""
        if max < 1 or min_idle < 0 or min_idle > max:
            raise ValueError("need 0 <= min_idle <= max and max >= 1")
        self.engine = engine
        self.image = image
        self.reference = reference or image
        self.node = node
        self.budget = budget
        self.configured = configured
        self.last_leased = time.monotonic()
        self.profile = profile or Profile()
        self.name = name or image
        self.instance = instance or uuid.uuid4().hex[:12]
        self.labels = {**(labels or {}), "ufaas.pool": self.name, "ufaas.instance": self.instance}
        self.min_idle = min_idle
        self.max = max
        self.idle_ttl = idle_ttl
        self.watch_interval = watch_interval
        self.workdirs_kept = workdirs_kept
        self.mode: str | None = None  # "agent" or "exec", decided by the first container
        self._containers: dict[str, Container] = {}
        self._idle: collections.deque[Container] = collections.deque()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._starting = 0
        self._started = 0
        self._failed_starts = 0
        self._start_failures = 0
        self._retired: collections.Counter[str] = collections.Counter()
        self._last_error: str | None = None
        self._told_preload = False
        self._wake = trio.Event()
        self._parked = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._closed = False

    # -- life -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Pool] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Fill, watch and reap until cancelled or closed; then remove every container of
        the pool."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._fill_forever)
                    nursery.start_soon(self._watch_forever)
                    task_status.started(self)
        finally:
            self._closed = True
            for w in self._waiters:
                w.error = PoolClosed("pool is shutting down")
                w.event.set()
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await self._remove_all()

    async def _remove_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in list(self._containers.values()):
                nursery.start_soon(self._destroy_now, c)
        # Catch containers whose start we gave up on half-way.
        try:
            for info in await self.engine.containers(
                    {"ufaas.pool": self.name, "ufaas.instance": self.instance}):
                await self.engine.remove(info.id)
        except EngineError as exc:
            log.warning("pool %s: final clean-up incomplete: %s", self.name, exc)

    def close(self) -> None:
        """Stop serving: ``serve`` removes every container and returns."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    def size(self) -> int:
        """Containers it has or is starting (what counts against a budget)."""
        return len(self._containers) + self._starting

    def in_use(self) -> bool:
        return bool(self._waiters or self._starting
                    or any(c.state == "busy" for c in self._containers.values()))

    async def wait_warm(self, count: int | None = None, timeout: float = 60.0) -> None:
        """Wait until ``count`` (default ``min_idle``) containers are idle."""
        count = self.min_idle if count is None else count
        with trio.fail_after(timeout):
            while len(self._idle) < count:
                await self._parked.wait()

    def statistics(self) -> PoolStatistics:
        busy = sum(1 for c in self._containers.values() if c.state == "busy")
        return PoolStatistics(
            image=self.image, name=self.name, mode=self.mode, idle=len(self._idle), busy=busy,
            starting=self._starting, total=len(self._containers) + self._starting,
            waiting=len(self._waiters), started=self._started,
            failed_starts=self._failed_starts, last_error=self._last_error,
            start_failures=self._start_failures, retired=dict(self._retired),
            zygote=self._zygotes(),
        )

    def _zygotes(self) -> dict[str, Any] | None:
        if self.mode != "agent" or not self.profile.zygote:
            return None
        said = [z for z in (getattr(c.runner, "zygote", None)
                            for c in self._containers.values()) if z]
        failed: dict[str, str] = {}
        for z in said:
            failed.update(z.get("failed") or {})
        errors = [z["error"] for z in said if z.get("error")]
        sizes = [z["rss"] for z in said if z.get("rss")]
        return {"preload": list(self.profile.preload),
                "ready": sum(1 for z in said if z.get("state") == "ready"),
                "failed": failed, "error": errors[-1] if errors else None,
                "rss": max(sizes) if sizes else None}

    def container(self, cid: str) -> Container | None:
        return self._containers.get(cid)

    def container_ids(self) -> list[str]:
        """The containers in service."""
        return [c.id for c in self._containers.values() if c.state != "dead"]

    def alive(self, cid: str) -> bool:
        """Whether container ``cid`` is ours and in service."""
        c = self._containers.get(cid)
        return c is not None and c.state != "dead" and c.runner.alive

    def discard(self, cid: str) -> None:
        """Remove container ``cid`` now if idle, else when its lease ends."""
        c = self._containers.get(cid)
        if c is None:
            return
        if c.state == "idle":
            self._retire(c, "discarded")
        else:
            c.discarded = True

    # -- leases ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, near: Place | None = None, *, strict: bool = False,
                    timeout: float = math.inf) -> AsyncIterator[Lease]:
        """Hold a warm container for one function.

        With ``near`` (where an earlier function ran) the lease gets that container when it
        is alive, waiting while it is busy, and reuses its working directory; otherwise
        any container (``lease.hit`` False), or PoolError when ``strict``. Waits at most
        ``timeout`` seconds for a container, then raises LeaseTimeout; the time the block
        takes once it has one is the caller's.
        """
        lease = await self.acquire(near, strict=strict, timeout=timeout)
        try:
            yield lease
        finally:
            lease.release()

    async def acquire(self, near: Place | None = None, *, strict: bool = False,
                      timeout: float = math.inf) -> Lease:
        """What :meth:`lease` holds, for a caller whose lease outlives a block: it must
        ``release()`` it."""
        lease = self.claim(near)
        if lease is None:
            with trio.move_on_after(timeout):
                lease = await self._acquire(near, strict)
            if lease is None:  # the deadline struck while it waited
                raise LeaseTimeout(f"no container became free within {timeout:g} s")
        return lease

    def claim(self, near: Place | None = None) -> Lease | None:
        """A lease at once, without waiting, or None: on ``near``'s container if it is idle
        (a hit), else on any idle container when no ``near`` is given. Whoever claims it
        must ``release()`` it; when this gives None, ``lease()`` knows what to do."""
        if self._closed:
            return None
        if near is not None:
            c = self._containers.get(near.container)
            if (c is not None and c.state == "idle" and c.runner.alive
                    and near.workdir in c.workdirs):
                self._take(c)
                return Lease(self, c, near.workdir, True)
            return None
        while self._idle and not self._idle[-1].runner.alive:
            self._retire(self._idle[-1], "lost")
        if not self._idle:
            return None
        c = self._idle.pop()  # the most recently used: its caches are warmest
        self._take(c)
        return Lease(self, c, uuid.uuid4().hex, None)

    def claim_idle(self, cid: str, workdir: str) -> Lease | None:
        """A lease at once on container ``cid`` in a new ``workdir``, or None when it is
        not idle: for a caller that chose it from :meth:`idle_ids` (a front that does
        its own choosing, and must not wait a round trip for a node's)."""
        c = self._containers.get(cid)
        if (self._closed or c is None or c.state != "idle" or not c.runner.alive
                or workdir in c.workdirs):
            return None
        self._take(c)
        return Lease(self, c, workdir, None)

    def idle_ids(self) -> list[str]:
        """The idle containers, the one :meth:`claim` gives next last."""
        return [c.id for c in self._idle]

    async def _acquire(self, near: Place | None, strict: bool) -> Lease:
        """A lease when :meth:`claim` had none to give: wait for ``near``'s busy container,
        or for any container."""
        if self._closed:
            raise PoolClosed("pool is shutting down")
        if near is not None:
            c = self._containers.get(near.container)
            if c is not None and not c.runner.alive:
                self._retire(c, "lost")
            elif c is not None and c.state != "dead" and near.workdir in c.workdirs:
                got = await self._wait(c.waiters)
                if got is c:
                    return Lease(self, c, near.workdir, True)
                if got is not None:  # pragma: no cover - only the named container is handed
                    self._release(got)
            if strict:
                raise PoolError("the container of that function is gone")
        lease = self.claim()
        if lease is None:
            self._wake.set()
            c = await self._wait(self._waiters)
            if c is None:
                raise PoolError("no container available")
            lease = Lease(self, c, uuid.uuid4().hex, None)
        if near is not None:
            lease.hit = False
        return lease

    async def _wait(self, queue: collections.deque[_Waiter]) -> Container | None:
        w = _Waiter()
        queue.append(w)
        if queue is self._waiters:
            self._wake.set()
        try:
            await w.event.wait()
        except BaseException:
            if w in queue:
                queue.remove(w)
            if w.container is not None:  # handed over just as we were cancelled
                self._release(w.container)
            raise
        if w.error is not None:
            raise w.error
        return w.container

    def _take(self, c: Container) -> None:
        c.state = "busy"
        c.uses += 1
        self.last_leased = time.monotonic()
        if c in self._idle:
            self._idle.remove(c)
        if self._deficit() > 0:  # else the filler has nothing to do: let it sleep
            self._wake.set()

    def _release(self, c: Container, *, discard: bool = False) -> None:
        runner = c.runner
        c.last_used = time.monotonic()
        reason = ("closed" if self._closed else "discarded" if discard or c.discarded
                  else "lost" if not runner.alive or c.state == "dead"
                  else "unclean" if runner.tainted else None)
        if reason is not None:
            self._retire(c, reason)
            return
        while len(c.workdirs) > self.workdirs_kept:
            old, _ = c.workdirs.popitem(last=False)
            runner.drop(old)
        self._hand_over(c)

    def _hand_over(self, c: Container) -> None:
        """Give an idle container to whoever waits for it, else park it."""
        for queue in (c.waiters, self._waiters):
            if queue:
                w = queue.popleft()
                c.state = "busy"
                c.uses += 1
                w.container = c
                w.event.set()
                return
        c.state = "idle"
        self._idle.append(c)
        self._parked.set()
        self._parked = trio.Event()

    def _retire(self, c: Container, reason: str) -> None:
        """Take a container out of service and remove it in the background; ``reason`` is
        one of RETIRE_REASONS, counted in the statistics."""
        if c.state == "dead" and c.id not in self._containers:
            return
        self._retired[reason] += 1
        c.state = "dead"
        if c in self._idle:
            self._idle.remove(c)
        self._containers.pop(c.id, None)
        while c.waiters:  # locality waiters fall back to any container
            w = c.waiters.popleft()
            w.event.set()
        self._spawn(self._destroy_now, c)
        self._wake.set()
        if self.budget is not None:
            self.budget.freed()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is not None and not self._closed:
            try:
                self._nursery.start_soon(fn, *args)
            except RuntimeError:
                # Shutting down: serve()'s final sweep removes every labelled container.
                pass

    async def _destroy_now(self, c: Container) -> None:
        c.state = "dead"
        self._containers.pop(c.id, None)
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await c.runner.aclose()
                await self.engine.remove(c.id)
            except EngineError as exc:
                log.warning("pool %s: could not remove %s: %s", self.name, c.short_id, exc)

    # -- background -----------------------------------------------------------------------

    def _lost(self, cid: str) -> None:
        """A container's agent stream ended: replace the container if nobody holds it."""
        c = self._containers.get(cid)
        if c is not None and c.state == "idle":
            self._retire(c, "lost")
        self._wake.set()

    def _deficit(self) -> int:
        total = len(self._containers) + self._starting
        want = max(self.min_idle - len(self._idle), 0) + len(self._waiters) - self._starting
        deficit = max(min(self.max - total, want), 0)
        if self.budget is not None and deficit:
            room = self.budget.room()
            # A function waits and the cap is reached: an idle container elsewhere goes.
            while room < min(deficit, len(self._waiters)) and self.budget.make_room(self):
                room += 1
            deficit = max(min(deficit, room), 0)
        return deficit

    async def _fill_forever(self) -> None:
        backoff = 0.0
        while True:
            # Until the first container decides agent or exec, start one at a time.
            parallel = 1 if self.mode is None else 2
            while self._deficit() > 0 and self._starting < parallel:
                self._starting += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._start_one)
            self._wake = trio.Event()
            await self._wake.wait()
            if self._failed_starts and self._last_error is not None:
                backoff = min(max(backoff * 2, 0.2), _BACKOFF_MAX)
                await trio.sleep(backoff)
            else:
                backoff = 0.0

    async def _start_one(self) -> None:
        try:
            cid, runner = await self._start_container()
        except (EngineError, trio.TooSlowError, OSError, NoAgent) as exc:
            self._failed_starts += 1
            self._start_failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning("pool %s: container start failed: %s", self.name, self._last_error)
            if isinstance(exc, ImageMissing) or not await self.engine.ping():
                fatal = isinstance(exc, ImageMissing)
            else:
                fatal = self._failed_starts >= 3 and not self._containers
            if fatal:
                while self._waiters:
                    w = self._waiters.popleft()
                    w.error = PoolError(self._last_error)
                    w.event.set()
            return
        finally:
            self._starting -= 1
            self._wake.set()
        self._started += 1
        self._failed_starts = 0
        self._last_error = None
        c = Container(cid, runner)
        self._containers[cid] = c
        failed = (getattr(runner, "zygote", None) or {}).get("failed")
        if failed and not self._told_preload:  # once: every container would say the same
            self._told_preload = True
            log.warning("pool %s: preload failed, the zygote goes without: %s", self.name,
                        "; ".join(f"{name} ({why})" for name, why in failed.items()))
        self._hand_over(c)

    async def _start_container(self) -> tuple[str, AgentRunner | ExecRunner]:
        """A new container and its runner: the agent's, unless the pool runs by plain exec
        (decided by its first container: an image that cannot run the agent)."""
        if self.mode in (None, "agent"):
            try:
                return await self._start_with(agent=True)
            except (CannotStart, NoAgent) as exc:
                if self.mode == "agent":
                    raise
                log.info("pool %s: no agent (%s); using plain exec", self.name, exc)
        return await self._start_with(agent=False)

    async def _start_with(self, *, agent: bool) -> tuple[str, AgentRunner | ExecRunner]:
        assert self._nursery is not None
        user = self.profile.user
        cid, stream = await self.engine.start_container(
            self.image, agent_argv(user) if agent else LIFELINE, labels=self.labels,
            profile=self.profile, workdir_root=WORKDIR_ROOT,
            capabilities=AGENT_CAPABILITIES if agent else ())
        runner: AgentRunner | ExecRunner
        if agent:
            runner = AgentRunner(self.engine, cid, stream, on_lost=lambda: self._lost(cid),
                                 preload=self.profile.preload if self.profile.zygote else None)
        else:
            runner = ExecRunner(self.engine, cid, stream, user, on_lost=lambda: self._lost(cid))
        try:
            await runner.start(self._nursery)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await stream.aclose()
                with contextlib.suppress(EngineError):
                    await self.engine.remove(cid)
            raise
        self.mode = "agent" if agent else "exec"
        return cid, runner

    async def _watch_forever(self) -> None:
        """Notice dead containers (killed, engine restarted) and shrink idle ones."""
        while True:
            await trio.sleep(self.watch_interval)
            now = time.monotonic()
            surplus = len(self._idle) - self.min_idle
            for c in list(self._idle):
                if surplus <= 0:
                    break
                if now - c.last_used > self.idle_ttl:
                    self._retire(c, "idle")
                    surplus -= 1
            for c in list(self._containers.values()):
                if not c.runner.alive and c.state == "idle":
                    self._retire(c, "lost")
            try:
                with trio.fail_after(self.engine.call_timeout):
                    running = {
                        info.id for info in await self.engine.containers(
                            {"ufaas.pool": self.name, "ufaas.instance": self.instance})
                        if info.state == "running"
                    }
            except (EngineError, trio.TooSlowError):
                running = set()
            for c in list(self._containers.values()):
                if c.id not in running:
                    c.runner.alive = False
                    if c.state == "idle":
                        self._retire(c, "lost")
            self._wake.set()


def pool_name(image: str, profile: Profile) -> str:
    """A stable, readable pool name: the image, plus a digest when the profile is custom."""
    if profile == Profile():
        return image
    digest = hashlib.sha256(repr(profile).encode()).hexdigest()[:8]
    return f"{image}@{digest}"


class Pools:
    """All pools of one server instance, keyed by image and profile.

    ``home`` names the state the instance belongs to (say, its database): containers
    left by an earlier instance with the same home are removed at start.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        home: str = "default",
        instance: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_containers: int = DEFAULT_MAX_CONTAINERS,
        node: str | None = None,
        **defaults: Any,
    ) -> None:
        """``defaults`` are :class:`Pool` settings (``min_idle``, ``max``, ``idle_ttl``...)
        for every pool that :meth:`add` is not given them for; the rest keep Pool's own.
        All pools together have at most ``max_containers``. ``node``: see :class:`Pool`."""
        self.engine = engine
        self.node = node
        self.home = home
        self.instance = instance or uuid.uuid4().hex[:12]
        self.labels = {**(labels or {}), "ufaas.home": home}
        self.defaults = defaults
        self.budget = Budget(max_containers, lambda: self._pools.values())
        self._pools: dict[tuple[str, Profile], Pool] = {}
        self._starting: dict[tuple[str, Profile], trio.Event] = {}
        self._ids: dict[str, tuple[str, float]] = {}  # image name -> (ID, when resolved)
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[Pools] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Remove stale containers of this home, then own the pools until cancelled."""
        await self.remove_stale()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                nursery.start_soon(self._sweep_unstarted_forever)
                await self._reap_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    for info in await self.engine.containers({"ufaas.instance": self.instance}):
                        await self.engine.remove(info.id)
                except EngineError:
                    pass

    async def remove_stale(self) -> int:
        """Remove containers of earlier instances of this home; return how many."""
        try:
            found = await self.engine.containers({"ufaas.home": self.home})
        except EngineError as exc:
            log.warning("could not look for stale containers: %s", exc)
            return 0
        stale = [c for c in found if c.labels.get("ufaas.instance") != self.instance]
        await self.engine.remove_each(c.id for c in stale)  # one that fails is logged
        return len(stale)

    async def add(self, image: str, profile: Profile | None = None, *,
                  configured: bool = False, **settings: object) -> Pool:
        """The pool of ``image`` (however spelt: pools are keyed by the engine's image ID)
        and ``profile``, started if it does not run yet. Raise PoolError when the image is
        neither here nor pullable. A pool not ``configured`` goes once unused for its
        ``idle_ttl``."""
        profile = profile or Profile()
        key = (await self._resolve(image), profile)
        while key not in self._pools:
            if key in self._starting:
                await self._starting[key].wait()
                continue
            if self._nursery is None:
                raise PoolClosed("pools are not being served")
            done = self._starting[key] = trio.Event()
            try:
                options = {**self.defaults, **settings}
                pool = Pool(self.engine, key[0], profile, name=pool_name(image, profile),
                            instance=self.instance, labels=self.labels, budget=self.budget,
                            configured=configured, reference=image, node=self.node,
                            **options)
                self._pools[key] = await self._nursery.start(pool.serve)
            finally:
                del self._starting[key]
                done.set()
        pool = self._pools[key]
        pool.configured = pool.configured or configured
        return pool

    async def _resolve(self, image: str) -> str:
        known = self._ids.get(image)
        if known is not None and time.monotonic() - known[1] < IMAGE_ID_TTL:
            return known[0]
        try:
            image_id = await self.engine.image_id(image)
        except ImageMissing as exc:
            raise PoolError(f"image {image!r} is not available: {exc}") from exc
        except EngineError as exc:
            raise PoolError(f"image {image!r}: {exc}") from exc
        self._ids[image] = (image_id, time.monotonic())
        return image_id

    def get(self, image: str, profile: Profile | None = None) -> Pool | None:
        """The pool of ``image`` and ``profile`` if it runs, asking the engine nothing."""
        known = self._ids.get(image)
        return None if known is None else self._pools.get((known[0], profile or Profile()))

    async def remove_unstarted(self) -> int:
        """Remove the containers of any ufaas instance on this engine that were created
        more than UNSTARTED_GRACE ago and never started; return how many. A container
        that runs ends with its instance (its lifeline); one killed between its create
        and its start has no process to end, whoever made it."""
        try:
            found = await self.engine.containers(["ufaas.instance"])
        except EngineError as exc:
            log.warning("could not look for containers never started: %s", exc)
            return 0
        cutoff = time.time() - UNSTARTED_GRACE
        left = [c.id for c in found if c.state == "created" and c.created < cutoff]
        await self.engine.remove_each(left)  # what fails goes at the next sweep
        if left:
            log.info("removed %d containers created but never started", len(left))
        return len(left)

    async def _sweep_unstarted_forever(self) -> None:
        while True:
            await self.remove_unstarted()
            await trio.sleep(UNSTARTED_GRACE)

    async def _reap_forever(self) -> None:
        """Close pools not configured that nobody has used for their ``idle_ttl``: an image
        asked for once keeps no container for good."""
        while True:
            await trio.sleep(self.defaults.get("watch_interval", DEFAULT_WATCH_INTERVAL))
            now = time.monotonic()
            for key, pool in list(self._pools.items()):
                if (not pool.configured and not pool.in_use()
                        and now - pool.last_leased > pool.idle_ttl):
                    log.info("pool %s: unused for %g s, closed", pool.name, pool.idle_ttl)
                    del self._pools[key]
                    pool.close()

    def find(self, cid: str) -> Pool | None:
        """The pool that owns container ``cid``, if any."""
        for pool in self._pools.values():
            if pool.container(cid) is not None:
                return pool
        return None

    def alive(self, cid: str) -> bool:
        """Whether container ``cid`` is in service: a locality follow-up can run there."""
        pool = self.find(cid)
        return pool is not None and pool.alive(cid)

    def discard(self, cid: str) -> None:
        """Remove container ``cid`` now if idle, else when its lease ends; gone: nothing."""
        pool = self.find(cid)
        if pool is not None:
            pool.discard(cid)

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self._pools.values()))
