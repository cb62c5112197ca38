"""``ufaas node``: this machine's Docker engine, served as warm pools to ufaas fronts over
an authenticated WebSocket. A front leases, runs, streams, cancels and moves images here;
there is no HTTP API, the exec streams stay on this machine, and the engine is never
exposed on the network.

Each front (a database, so a restarted front is the same one) gets pools of its own: they
live while it is connected, and ``front_grace`` seconds after; a new run of that front
takes them over or, when its instance differs, has them removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeGuard

import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from pool import (
    Engine,
    EngineError,
    File,
    ImageMissing,
    Job,
    Lease,
    LeaseTimeout,
    MiB,
    Outputs,
    Place,
    Pool,
    PoolError,
    Pools,
    PoolStatistics,
    Profile,
    Result,
)

from .config import Config
from .wire import (
    COUNTERS,
    FRONT_HEADER,
    PROTOCOL_HEADER,
    TOKEN_HEADER,
    Credit,
    Inbox,
    Outbox,
    WireError,
    counts,
    fields_of,
    message,
    messages,
    mismatch,
    pack,
    send_each,
    speaks,
)

log = logging.getLogger("ufaas.node")

# What a front may ask of one run, whatever its own settings: the most output per stream
# kept (and queued here while the front reads it).
MAX_OUTPUT_CAP = 64 * MiB
# ... and of the output files of one run, in all and in number.
MAX_OUTPUT_FILES = 64 * MiB
MAX_OUTPUT_COUNT = 1024
# Bytes of stdin, and of an image, sent and not yet consumed here.
STDIN_WINDOW = 1 * MiB
IMAGE_WINDOW = 8 * MiB
RECEIVE_BUFFER = 65536
MAX_ID = 64  # characters of an id a front gives (a lease's, a request's, its own)
# A run's output waits (wire.LATER at most) for more of it, or for its result, to go in
# the same message: one message for a short function's output and its end, not two.
OUTPUT_HOLD_BYTES = 256 * 1024  # a run holding more goes live: what it says, as it comes
# How often stopped containers of this node (a removal that failed leaves one "dead") are
# looked for and removed.
SWEEP_EVERY = 5.0


class NodeError(Exception):
    """The node cannot serve (no token, say)."""


def pool_view(pool: Pool) -> dict[str, Any]:
    """What a front learns of one pool: for scheduling, ``GET /pools`` and strict
    follow-ups (its containers)."""
    return {"name": pool.name, "reference": pool.reference, "image": pool.image,
            "profile": pool.profile, "min_idle": pool.min_idle, "max": pool.max,
            "configured": pool.configured, "statistics": pool.statistics(),
            "containers": pool.container_ids(), "idle": pool.idle_ids()}


# The fields of a pool's statistics that are not counters: a change to one of them sends
# the pool's full view.
_NOT_COUNTERS = tuple(f.name for f in dataclasses.fields(PoolStatistics)
                      if f.name not in COUNTERS)


def _short(value: object) -> str:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID else ""


@dataclass(eq=False)
class _Front:
    """One front's pools on this node."""

    home: str
    instance: str
    pools: Pools
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sessions: int = 0
    gone_at: float = 0.0


@dataclass(eq=False)
class _Held:
    """A lease a front asked for: waiting for a container, then held until released."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    run: Job | None = None  # its job, once its run came
    asked: trio.Event = field(default_factory=trio.Event)  # run or release came
    released: trio.Event = field(default_factory=trio.Event)
    discard: bool = False
    # Its run's: made with it, so that a cancel read before the run starts is kept.
    run_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stdin: Inbox | None = None
    lease: Lease | None = None  # once it holds a container
    pool: Pool | None = None
    ran: bool = False  # its run is over: a release gives the container back at once
    counted: bool = False  # the front counted its container idle again on its release
    out: list[list[Any]] = field(default_factory=list)  # its output held: [fd, bytearray]
    out_bytes: int = 0
    live: bool = False  # its output goes as it comes (someone types to it, or it said much)

    def take_out(self) -> list[list[Any]]:
        """The output it holds, no longer held."""
        out, self.out, self.out_bytes = self.out, [], 0
        return out


class NodeServer:
    """Serves this engine's pools to fronts. Run with ``await nursery.start(node.serve)``,
    which gives the port once it listens; cancelling it ends every session and removes
    every container made here."""

    def __init__(self, config: Config, *, speaks_as: str | None = None,
                 labels: dict[str, str] | None = None) -> None:
        """``speaks_as`` replaces what this node says it speaks (tests of a mismatch)."""
        self.config = config
        self.cluster = config.cluster
        self.token = (self.cluster.secret() or "").encode()
        if not self.token:
            raise NodeError("a node needs the cluster's token: set cluster.token_file "
                            "(UFAAS_CLUSTER_TOKEN_FILE, --token-file) or cluster.token")
        self.labels = {**config.labels, **(labels or {})}
        self.engine = Engine(config.docker_host, call_timeout=config.engine_timeout)
        self.speaks = speaks_as or speaks()
        self.name = self.cluster.name or ""
        self.engine_ok = True
        self._fronts: dict[str, _Front] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            if not self.name:
                self.name = str((await self.engine.info()).get("Name") or "")
            await self._remove_leftovers()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_engine)
                nursery.start_soon(self._sweep_forever)
                server = await nursery.start(partial(
                    serve_websocket, self._handle, self.cluster.listen, self.cluster.node_port,
                    None, max_message_size=self.cluster.max_message,
                    receive_buffer_size=RECEIVE_BUFFER,
                    connect_timeout=self.cluster.connect_timeout,
                    disconnect_timeout=self.cluster.connect_timeout))
                log.info("ufaas node %s ready at ws://%s:%d", self.name, self.cluster.listen,
                         server.port)
                task_status.started(server.port)
        except EngineError as exc:
            raise NodeError(f"the Docker engine does not answer: {exc}") from exc
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.engine.aclose()

    async def _remove_leftovers(self, states: tuple[str, ...] | None = None) -> set[str]:
        """Remove every container a previous run of this node left on its engine (one
        node per engine): after a crash or a power cut nobody else will. With ``states``,
        only those in one of them. Gives those the engine listed but says it does not have."""
        found = [c for c in await self.engine.containers({"ufaas.node": self.name})
                 if states is None or c.state in states]
        missing = await self.engine.remove_each(c.id for c in found)
        if len(found) > len(missing):
            log.info("removed %d containers of this node's %s", len(found) - len(missing),
                     "previous run" if states is None else "that had stopped")
        return missing

    async def _sweep_forever(self) -> None:
        """Pool containers remove themselves when they stop (AutoRemove); one whose removal
        failed stays 'dead' (seen after an engine restart, from an earlier run's removal)
        until something removes it again: this does, every SWEEP_EVERY seconds.

        An engine restarted after a kill can also keep listing a container it no longer
        has (Docker 20.10 does, when its restore and the container's auto-removal cross):
        one its removal does not find at two sweeps in a row is said once, in the log."""
        missing: set[str] = set()
        told: set[str] = set()
        while True:
            await trio.sleep(SWEEP_EVERY)
            try:
                before, missing = missing, await self._remove_leftovers(("dead", "exited"))
            except EngineError as exc:
                log.warning("could not look for stopped containers: %s", exc)
                continue
            stale = missing & before
            for cid in sorted(stale - told):
                log.warning("the engine lists container %s but has no such container: a "
                            "stale entry of its own, gone when the engine restarts", cid[:12])
            told = stale

    async def _watch_engine(self) -> None:
        while True:
            ok = await self.engine.ping(timeout=self.cluster.node_timeout)
            if ok != self.engine_ok:
                log.warning("engine %s", "answers again" if ok else "does not answer")
            self.engine_ok = ok
            await trio.sleep(self.cluster.heartbeat)

    # -- fronts ---------------------------------------------------------------------------

    async def _handle(self, request: WebSocketRequest) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        remote = request.remote
        peer = (f"{remote.address}:{remote.port}" if isinstance(remote, Endpoint)
                else str(remote))
        scheme, _, given = headers.get(TOKEN_HEADER, "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token):
            log.warning("refused a front at %s: wrong or missing cluster token", peer)
            await request.reject(403, body=b"wrong or missing cluster token")
            return
        why = mismatch(self.speaks, headers.get(PROTOCOL_HEADER, ""), we="node", they="front")
        if why is not None:
            log.warning("refused the front at %s: %s", peer, why)
            await request.reject(409, body=why.encode())
            return
        home, _, instance = headers.get(FRONT_HEADER, "").partition(" ")
        if not _short(home) or not _short(instance):
            await request.reject(400, body=b"no front identity (ufaas-front: HOME INSTANCE)")
            return
        ws = await request.accept()
        front = await self._front(home, instance)
        front.sessions += 1
        log.info("front %s (%s) connected from %s", home, instance, peer)
        try:
            await Session(self, ws, front.pools, peer).run()
        except Exception:  # a bug must end one session, not the node
            log.exception("session of the front at %s failed", peer)
        finally:
            front.sessions -= 1
            front.gone_at = time.monotonic()
            log.info("front %s (%s) at %s disconnected", home, instance, peer)
            assert self._nursery is not None
            self._nursery.start_soon(self._forget_later, front)

    async def _front(self, home: str, instance: str) -> _Front:
        """The pools of front ``home``: its own if this instance had them, else new ones
        (which remove what an earlier instance of it left on this engine)."""
        front = self._fronts.get(home)
        if front is not None and front.instance == instance:
            return front
        if front is not None:
            log.info("front %s restarted: removing the containers of its instance %s",
                     home, front.instance)
            front.scope.cancel()
        pools = Pools(self.engine, home=f"{home}-{self.name}", instance=f"{instance}-{self.name}",
                      labels={**self.labels, "ufaas.node": self.name},
                      max_containers=self.config.max_containers, node=self.name,
                      min_idle=self.config.min_idle, max=self.config.max,
                      idle_ttl=self.config.idle_ttl)
        front = self._fronts[home] = _Front(home, instance, pools)
        assert self._nursery is not None
        await self._nursery.start(self._serve_pools, front)
        return front

    async def _serve_pools(self, front: _Front, *, task_status: trio.TaskStatus[None]) -> None:
        with front.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(front.pools.serve)
                task_status.started()
        if self._fronts.get(front.home) is front:
            del self._fronts[front.home]

    async def _forget_later(self, front: _Front) -> None:
        """A front gone for ``front_grace`` seconds loses its pools, and their containers."""
        await trio.sleep(self.cluster.front_grace)
        if front.sessions == 0 and time.monotonic() - front.gone_at >= self.cluster.front_grace:
            log.info("front %s gone for %g s: its pools are closed", front.home,
                     self.cluster.front_grace)
            front.scope.cancel()


class Session:
    """One front's connection: every message it sends, and everything its leases hold,
    for as long as it keeps talking (``node_timeout`` of silence ends it)."""

    def __init__(self, node: NodeServer, ws: WebSocketConnection, pools: Pools,
                 peer: str) -> None:
        self.node = node
        self.ws = ws
        self.pools = pools
        self.peer = peer
        self.timeout = node.cluster.node_timeout
        self.outbox = Outbox(later_last=True)  # views say what is true after the rest
        self._held: dict[str, _Held] = {}
        self._inboxes: dict[str, Inbox] = {}
        self._credits: dict[str, Credit] = {}
        self._streams: dict[str, trio.CancelScope] = {}  # image exports and imports
        # Each pool's number in this session, the rest of its view (all but its counters
        # and idle containers) as the front was last told it, and those counters and
        # containers as it was last told them.
        self._shown: dict[Pool, tuple[int, tuple, tuple]] = {}
        self._numbered: dict[int, Pool] = {}
        self._numbers = itertools.count()
        self._nursery: trio.Nursery | None = None
        # Pools with a release since their last view that the front did not count itself.
        self._uncounted: set[Pool] = set()

    def send(self, data: bytes) -> None:
        """Queue a message: the sender sends them in order, each within the deadline."""
        self.outbox.put(data)

    async def run(self) -> None:
        hello = message("hello", node=self.node.name, speaks=self.node.speaks,
                        max_containers=self.pools.budget.limit)
        greeted = False
        with trio.move_on_after(self.timeout), contextlib.suppress(ConnectionClosed):
            await self.ws.send_message(hello)  # alone and first: the front reads it apart
            greeted = True
        if greeted:
            await self._serve()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.timeout):
                await self.ws.aclose()
            # A front that reads nothing but still sends leaves the close frame unsent
            # (aclose then ends at its deadline, the stream closed), and trio-websocket's
            # reader waiting for room to queue what came, which nobody takes now: take
            # it, with a deadline of its own, so that the reader finds the stream closed
            # and ends (else the connection's task never does).
            with trio.move_on_after(self.timeout), contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.get_message()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._send_forever)
            nursery.start_soon(self._beat_forever)
            try:
                await self._receive_forever()
            except WireError as exc:
                log.warning("front at %s broke the protocol: %s", self.peer, exc)
            nursery.cancel_scope.cancel()

    async def _send_forever(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            late = await send_each(self.outbox, self.ws.send_message, self.timeout)
            if late is not None:
                log.warning("front at %s %s", self.peer, late)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def _output(self, lid: str, held: _Held, fd: int, data: bytes) -> None:
        """Output of ``held``'s run: held to go with its result or the next message sent
        (within wire.LATER), or at once once its run is live."""
        if held.live:
            self._send_out(lid, fd, data)
            return
        if held.out and held.out[-1][0] == fd:
            held.out[-1][1] += data
        else:
            held.out.append([fd, bytearray(data)])
        held.out_bytes += len(data)
        if held.out_bytes <= OUTPUT_HOLD_BYTES:
            self.outbox.later(("out", lid), partial(self._held_output, lid, held))
            return
        held.live = True  # what it holds goes now, in order, and the rest as it comes
        for fd, data in held.take_out():
            self._send_out(lid, fd, data)

    def _send_out(self, lid: str, fd: int, data: bytes) -> None:
        self.send(pack({"op": "out", "lid": lid, "fd": fd}, [data]))

    @staticmethod
    def _held_output(lid: str, held: _Held) -> bytes | None:
        out = held.take_out()
        return message("out", {"out": out}, lid=lid) if out else None

    async def _beat_forever(self) -> None:
        while True:
            # Every pool in full, every beat: the front's view of them is never older.
            self._shown = {p: self._shown[p] for p in self.pools if p in self._shown}
            self._numbered = {shown[0]: p for p, shown in self._shown.items()}
            self.send(message("beat", {"pools": [self._view(p) for p in self.pools]},
                              engine=self.node.engine_ok))
            await trio.sleep(self.node.cluster.heartbeat)

    def _view(self, pool: Pool) -> dict[str, Any]:
        """``pool``'s full view, numbered for this session, as the front is now told."""
        view = pool_view(pool)
        number = self._shown[pool][0] if pool in self._shown else next(self._numbers)
        self._shown[pool] = (number, _rest(view), _said(view))
        self._numbered[number] = pool
        view["number"] = number
        return view

    def _about(self, op: str, pool: Pool, view: dict[str, Any] | None = None,
               **plain: Any) -> bytes:
        """A message about ``pool`` (whose ``view`` may be made already): its number and
        counters alone when the rest of its view is what the front was last told (a lease
        or a release changes counters and which containers are idle only), its full view
        otherwise. Most messages of a run are these: the counters spare encoding and
        decoding a view each time."""
        shown = self._shown.get(pool)
        if shown is not None:
            view = view or pool_view(pool)
            if _rest(view) == shown[1]:
                said = _said(view)
                self._shown[pool] = (shown[0], shown[1], said)
                return message(op, pool=shown[0], counts=said[0], idle=view["idle"],
                               **plain)
        return message(op, {"pool": self._view(pool)}, **plain)

    def _released(self, pool: Pool) -> bytes | None:
        """The view of ``pool`` after its releases; None when the front counted each of
        them itself (its container idle again) and the pool is now what the front was
        last told, as it is after a claim and its run."""
        counted = pool not in self._uncounted
        self._uncounted.discard(pool)
        shown, view = self._shown.get(pool), pool_view(pool)
        if (counted and shown is not None and _said(view) == shown[2]
                and _rest(view) == shown[1]):
            return None
        return self._about("view", pool, view)

    async def _receive_forever(self) -> None:
        while True:
            with trio.move_on_after(self.timeout):
                try:
                    data = await self.ws.get_message()
                except ConnectionClosed:
                    return
                for header, parts in messages(data):
                    self._dispatch(header, parts)
                continue
            log.warning("front at %s silent for %g s: closing", self.peer, self.timeout)
            return

    def _ack(self, lid: str, size: int) -> None:
        self.send(message("ack", lid=lid, bytes=size))

    def _dispatch(self, header: dict[str, Any], parts: list[bytes]) -> None:
        op, lid = header["op"], _short(header.get("lid"))
        assert self._nursery is not None
        if op == "beat":
            return
        job = _job(header, parts) if op == "run" else None  # checked before anything
        if op == "run" and lid and lid not in self._held and "container" in header:
            self._claim(lid, header)  # the container it runs in, chosen by the front
        if op == "lease" and lid and lid not in self._held:
            fields = _pool_fields(header, parts)
            timeout = header.get("timeout")
            if (not _number(timeout) or timeout < 0
                    or not isinstance(fields.get("near"), Place | None)):
                raise WireError("a lease without a timeout, or near no place")
            self._held[lid] = held = _Held()
            self._nursery.start_soon(self._lease, lid, held, fields, header)
        elif op == "run" and lid in self._held and self._held[lid].run is None:
            held = self._held[lid]
            held.run = job
            if header.get("live"):
                # Made here, not when the run starts: the stdin that follows the run
                # message may arrive before the lease's task wakes up to start it.
                held.stdin = Inbox(STDIN_WINDOW, partial(self._ack, lid))
            held.asked.set()
        elif op == "stdin" and lid in self._held:
            inbox = self._held[lid].stdin
            if inbox is not None:
                if parts and parts[0]:
                    inbox.put(parts[0])
                if header.get("eof"):
                    inbox.end()
        elif op == "cancel" and lid in self._held:
            self._held[lid].run_scope.cancel()
        elif op == "release" and lid in self._held:
            held = self._held[lid]
            held.discard = bool(header.get("discard"))
            held.counted = header.get("counted") is True and not held.discard
            held.released.set()
            held.asked.set()
            if held.run is None:
                held.scope.cancel()  # still waiting for a container: stop waiting
            elif held.ran:  # back at once: a claim of that container may come right behind
                self._let_go(lid, held)
        elif op == "discard":
            self.pools.discard(_short(header.get("container")))
        elif op == "pool":
            self._nursery.start_soon(self._pool, header, _pool_fields(header, parts))
        elif op in ("image_has", "image_export", "image_import"):
            self._images(op, header)
        elif op == "chunk" and _short(header.get("rid")) in self._inboxes:
            self._inboxes[header["rid"]].put(parts[0] if parts else b"")
        elif op == "image_end" and _short(header.get("rid")) in self._inboxes:
            self._inboxes[header["rid"]].end()
        elif op == "ack" and _short(header.get("rid")) in self._credits:
            self._credits[header["rid"]].give(header.get("bytes"))
        elif op == "image_cancel" and _short(header.get("rid")) in self._streams:
            self._streams[header["rid"]].cancel()
        elif op in ("run", "stdin", "cancel", "release", "chunk", "image_end", "ack",
                    "image_cancel"):
            pass  # about something that has just ended here: nothing to do
        else:
            raise WireError(f"an unknown or malformed {op!r} message")

    # -- leases and runs ------------------------------------------------------------------

    async def _add(self, header: dict[str, Any], fields: dict[str, Any]) -> Pool:
        try:
            return await self.pools.add(header["image"], fields["profile"],
                                        configured=bool(header.get("configured")),
                                        **header["sizes"])
        except (TypeError, ValueError) as exc:  # sizes no pool can have
            raise PoolError(f"a pool that cannot be: {exc}") from None

    async def _pool(self, header: dict[str, Any], fields: dict[str, Any]) -> None:
        rid = _short(header.get("rid"))
        try:
            pool = await self._add(header, fields)
        except PoolError as exc:
            self.send(message("failed", rid=rid, error=str(exc), kind=_kind(exc)))
            return
        self.send(self._about("pool", pool, rid=rid))

    def _claim(self, lid: str, header: dict[str, Any]) -> None:
        """The front chose an idle container itself (from the pool's view) and sends it
        with the run: it is taken here at once, before any later message is read, and the
        run goes on below; or the claim fails (it went meanwhile), and so does the run."""
        number, cid, workdir = (header.get("pool"), _short(header.get("container")),
                                header.get("workdir"))
        pool = self._numbered.get(number) if type(number) is int else None
        if not isinstance(workdir, str) or len(workdir) != 32 or not all(
                ch in "0123456789abcdef" for ch in workdir):
            raise WireError("a claim without a new workdir")
        lease = pool.claim_idle(cid, workdir) if pool is not None else None
        if lease is None:
            self.send(message("failed", lid=lid, kind="pool",
                              error=f"container {cid[:12]} was no longer idle"))
            return
        assert self._nursery is not None and pool is not None
        self._held[lid] = held = _Held()
        # No "leased": the front knows where it runs, and the run's result says it began.
        self._nursery.start_soon(self._hold, lid, held, pool, lease, False)

    async def _lease(self, lid: str, held: _Held, fields: dict[str, Any],
                     header: dict[str, Any]) -> None:
        lease: Lease | None = None
        try:
            with held.scope:  # cancelled by a release while it waits
                pool = await self._add(header, fields)
                lease = await pool.acquire(fields.get("near"), strict=bool(header.get("strict")),
                                           timeout=header["timeout"])
        except PoolError as exc:
            self.send(message("failed", lid=lid, error=str(exc), kind=_kind(exc)))
        finally:
            if lease is None:
                del self._held[lid]
        if lease is not None:
            await self._hold(lid, held, pool, lease)

    async def _hold(self, lid: str, held: _Held, pool: Pool, lease: Lease,
                    tell: bool = True) -> None:
        """Hold ``lease`` for the front (``tell``: saying where first): its run, then
        until the front releases it."""
        held.lease, held.pool = lease, pool
        try:
            if tell:
                self.send(self._about("leased", pool, lid=lid,
                                      container=lease.place.container,
                                      workdir=lease.place.workdir, hit=lease.hit))
            await held.asked.wait()
            if held.run is not None:
                await self._run(lid, held, lease)
                held.ran = True
                await held.released.wait()
        finally:
            self._let_go(lid, held)

    def _let_go(self, lid: str, held: _Held) -> None:
        """Give ``held``'s container back to its pool (once), and tell the front how that
        pool is now, with the next message."""
        if self._held.get(lid) is not held or held.lease is None or held.pool is None:
            return
        del self._held[lid]
        held.lease.discard = held.discard
        held.lease.release()
        if not held.counted:
            self._uncounted.add(held.pool)
        self.outbox.later(held.pool, partial(self._released, held.pool))

    async def _run(self, lid: str, held: _Held, lease: Lease) -> None:
        job = held.run
        assert job is not None
        job.output_cap = min(job.output_cap, MAX_OUTPUT_CAP)
        if job.outputs is not None:
            # Collected here into the result (no on_file): their bytes travel in it.
            job.outputs = dataclasses.replace(
                job.outputs, max_file=min(job.outputs.max_file, MAX_OUTPUT_FILES),
                max_total=min(job.outputs.max_total, MAX_OUTPUT_FILES),
                max_count=min(job.outputs.max_count, MAX_OUTPUT_COUNT))

        held.live = held.stdin is not None  # someone types to it: what it says goes live
        result: Result | None = None
        try:
            if not held.run_scope.cancel_called:  # else cancelled before it began
                with held.run_scope:
                    result = await lease.run(job, partial(self._output, lid, held),
                                             held.stdin)
        finally:
            out = held.take_out()
        if result is None:  # the front cancelled it: its processes are gone
            result = Result("cancelled")
        result.place = None  # the front knows where it ran
        result.stdout = result.stderr = b""  # it has them from "out" messages and "out" here
        self.send(message("result", {"result": result, "out": out}, lid=lid))

    # -- images ---------------------------------------------------------------------------

    def _images(self, op: str, header: dict[str, Any]) -> None:
        rid, image = _short(header.get("rid")), header.get("image")
        if not rid or not isinstance(image, str) or not image:
            raise WireError(f"an {op} without its id or image")
        if rid in self._credits or rid in self._inboxes or rid in self._streams:
            raise WireError(f"an {op} with the id of another one")
        assert self._nursery is not None
        if op != "image_has":  # made now: a cancel may come before its task starts
            self._streams[rid] = trio.CancelScope()
        if op == "image_has":
            self._nursery.start_soon(self._image_has, rid, image)
        elif op == "image_export":
            self._credits[rid] = Credit(IMAGE_WINDOW)
            self._nursery.start_soon(self._image_export, rid, image)
        else:
            self._inboxes[rid] = Inbox(IMAGE_WINDOW, lambda size: self.send(
                message("ack", rid=rid, bytes=size)))
            self._nursery.start_soon(self._image_import, rid, image)

    async def _image_has(self, rid: str, image: str) -> None:
        try:
            found: str | None = await self.node.engine.image_id(image, pull=False)
        except EngineError:
            found = None
        self.send(message("image", rid=rid, id=found))

    async def _image_export(self, rid: str, image: str) -> None:
        credit = self._credits[rid]
        size = 0
        try:
            with self._streams[rid]:
                async for chunk in self.node.engine.export_image(image):
                    await credit.take(len(chunk))
                    self.send(pack({"op": "chunk", "rid": rid}, [chunk]))
                    size += len(chunk)
                self.send(message("image_end", rid=rid, size=size))
        except Exception as exc:  # an export's failure is its own, not the session's
            if not isinstance(exc, EngineError):
                log.warning("export of %s failed: %s: %s", image, type(exc).__name__, exc)
            self.send(message("failed", rid=rid, error=f"cannot export {image}: {exc}"))
        finally:
            del self._credits[rid], self._streams[rid]

    async def _image_import(self, rid: str, image: str) -> None:
        inbox = self._inboxes[rid]
        try:
            with self._streams[rid]:  # the front may give up on it (image_cancel)
                said = await self.node.engine.import_image(inbox)
                found = await self.node.engine.image_id(image, pull=False)
                log.info("image %s loaded (%s)", image, "; ".join(said)[:200])
                self.send(message("imported", rid=rid, id=found))
        except EngineError as exc:
            self.send(message("failed", rid=rid, error=f"cannot load {image}: {exc}"))
        finally:
            del self._inboxes[rid], self._streams[rid]
            await inbox.aclose()


def _rest(view: dict[str, Any]) -> tuple:
    """All of a pool's view but its counters and idle containers."""
    stats = view["statistics"]
    return (tuple(v for k, v in view.items() if k not in ("statistics", "idle")),
            tuple(getattr(stats, name) for name in _NOT_COUNTERS))


def _number(value: object, *, finite: bool = False) -> TypeGuard[float]:
    """A JSON number, not NaN (nor infinite, when ``finite``), nor a bool."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and not math.isnan(value) and (not finite or math.isfinite(value)))


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def _job(header: dict[str, Any], parts: list[bytes]) -> Job:
    """The job of a run message, or WireError: each field of the type the pool expects
    (it was made by a front from a checked spec; anything else is a broken peer)."""
    job = fields_of(header, parts).get("job")
    if not isinstance(job, Job):
        raise WireError("a run without a job")
    outputs = job.outputs
    problems = [name for name, ok in (
        ("argv", isinstance(job.argv, list) and all(isinstance(a, str) for a in job.argv)),
        ("files", isinstance(job.files, list) and all(
            isinstance(f, File) and isinstance(f.path, str) and isinstance(f.data, bytes)
            and _count(f.mode) for f in job.files)),
        ("env", isinstance(job.env, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in job.env.items())),
        ("stdin", job.stdin is None or isinstance(job.stdin, bytes)),
        ("timeout", _number(job.timeout, finite=True) and job.timeout > 0),
        ("output_cap", _count(job.output_cap)),
        ("id", isinstance(job.id, str)),
        ("fresh", isinstance(job.fresh, bool)),
        ("cpu_limit", job.cpu_limit is None or _count(job.cpu_limit)),
        ("memory_limit", job.memory_limit is None or _count(job.memory_limit)),
        ("outputs", outputs is None or (
            isinstance(outputs, Outputs) and isinstance(outputs.patterns, tuple)
            and all(isinstance(p, str) for p in outputs.patterns)
            and all(_count(n) for n in (outputs.max_file, outputs.max_total,
                                        outputs.max_count)))),
    ) if not ok]
    if problems:
        raise WireError(f"a job whose {', '.join(problems)} cannot be")
    return job


def _said(view: dict[str, Any]) -> tuple:
    """A pool's counters and idle containers, as a view tells them."""
    return tuple(counts(view["statistics"])), tuple(view["idle"])


def _pool_fields(header: dict[str, Any], parts: list[bytes]) -> dict[str, Any]:
    """The fields of a message about a pool, checked: an image, a profile and sizes."""
    fields = fields_of(header, parts)
    sizes = header.get("sizes")
    if (not isinstance(header.get("image"), str) or not header["image"]
            or not isinstance(fields.get("profile"), Profile) or not isinstance(sizes, dict)
            or set(sizes) - {"min_idle", "max", "idle_ttl"}
            or not all(isinstance(v, int | float) for v in sizes.values())):
        raise WireError("a pool without an image, a profile or sizes")
    return fields


def _kind(exc: PoolError) -> str:
    """What a front does with a failed lease: ``image`` (stream it here from a node that
    has it), ``timeout`` (no container in time) or ``pool`` (anything else)."""
    if isinstance(exc.__cause__, ImageMissing):
        return "image"
    return "timeout" if isinstance(exc, LeaseTimeout) else "pool"

