"""The front's side of a cluster: its nodes, and each image's pool across them.

A node is this machine's engine, in-process (:class:`LocalNode`), or a ``ufaas node``
reached over WebSocket (:class:`RemoteNode`), listed in the config or found as the tasks
of a Swarm service and looked for again as they come and go. :class:`Cluster` offers the
scheduler what :class:`~pool.Pools` offers; where a lease goes, how an image reaches a node
that lacks it, and what a node's loss does to its functions are decided here.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import socket
import time
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket,
)

from pool import (
    EngineError,
    ImageMissing,
    Job,
    Lease,
    LeaseTimeout,
    MiB,
    OnFile,
    Output,
    Place,
    Pool,
    PoolError,
    Pools,
    PoolStatistics,
    Profile,
    Result,
)

from .config import Config
from .store import iso
from .wire import (
    FRONT_HEADER,
    PROTOCOL_HEADER,
    Credit,
    Inbox,
    Outbox,
    WireError,
    fields_of,
    message,
    messages,
    mismatch,
    pack,
    send_each,
    speaks,
    unpack,
    with_counts,
)

log = logging.getLogger("ufaas.cluster")
# Why a node lacks an image when no other ready node has it either: asked again as one joins.
NO_HOLDER = "no node has it"

RECEIVE_BUFFER = 65536
STDIN_CHUNK = 65536
FILE_CHUNK = 1 * MiB  # pieces of an output file handed to on_file
STDIN_WINDOW = 1 * MiB  # as the node's: bytes of stdin sent and not yet consumed there
IMAGE_WINDOW = 8 * MiB
# Beyond a run's own timeout, how long its node may take to say how it ended (a node
# that stops talking is lost sooner, after node_timeout).
KILL_GRACE = 3.0
RECONNECT_MIN = 0.5
# A node that went is asked again at most this often: a returning node is used again
# within it (a connection attempt costs little; one to a dead machine times out).
RECONNECT_MAX = 2.0
REFUSED_RETRY = 10.0  # a node that refused us is asked again this often
MISSING_TTL = 60.0  # how long "this node lacks that image" holds before it is asked again
PROGRESS_EVERY = 5.0  # seconds between two log lines of an image stream
REAP_EVERY = 10.0


class NodeLost(PoolError):
    """The node went away while a lease or a run depended on it."""


class Unclaimed(PoolError):
    """The container a front chose from a node's view had gone (or been taken) when its
    run came, or its node was lost before the run went: the run never started, and may
    wait for a container as any other."""


class ImageUnavailable(PoolError):
    """The node lacks the image and cannot pull it."""


@dataclass
class RemotePool:
    """What a node said of one of its pools: ``GET /pools`` and scheduling read it."""

    node: str
    name: str
    reference: str
    image: str
    profile: Profile
    min_idle: int
    max: int
    configured: bool
    stats: PoolStatistics
    containers: list[str]
    idle: list[str]  # the idle containers, the one the node would give next last
    number: int = -1  # as the node numbers it in this connection

    def statistics(self) -> PoolStatistics:
        return self.stats

    @classmethod
    def of(cls, node: str, view: Any) -> RemotePool:
        if not isinstance(view, dict) or not isinstance(view.get("statistics"), PoolStatistics):
            raise WireError("a pool view without its statistics")
        try:
            pool = cls(node=node, **{k: view[k] for k in (
                "name", "reference", "image", "profile", "min_idle", "max", "configured")},
                stats=view["statistics"], containers=list(view["containers"]),
                idle=_ids(view["idle"]))
        except (KeyError, TypeError) as exc:
            raise WireError(f"a pool view that does not hold: {exc}") from None
        if not isinstance(pool.profile, Profile) or not all(
                isinstance(c, str) for c in pool.containers):
            raise WireError("a pool view with no profile or odd containers")
        if not all(isinstance(v, str) for v in (pool.name, pool.reference, pool.image)) or not (
                type(pool.min_idle) is int and type(pool.max) is int
                and isinstance(pool.configured, bool)):
            raise WireError("a pool view whose names or sizes are not")
        return pool


def _ids(said: object) -> list[str]:
    if not isinstance(said, list) or not all(isinstance(c, str) for c in said):
        raise WireError("container IDs that are not")
    return said


# -- the pools of one image across the nodes -------------------------------------------------

class ClusterPool:
    """One image and profile across the nodes: where its leases go.

    A lease goes to the container it asks for (``near``) on that container's node; else to
    a node with an idle warm container of the pool, else to the node with the most room
    for one more (within the pool's ``max`` and the node's ``max_containers``), else to
    the one with the shortest queue, where it waits. ``min_idle`` and ``max`` hold per node.
    """

    def __init__(self, cluster: Cluster, image: str, profile: Profile, configured: bool,
                 sizes: dict[str, Any]) -> None:
        self.cluster = cluster
        self.image = image
        self.profile = profile
        self.configured = configured
        self.sizes = sizes
        self.last_leased = time.monotonic()

    @property
    def key(self) -> tuple[str, Profile]:
        return (self.image, self.profile)

    @property
    def reference(self) -> str:
        """The image as first named (a node's pool is keyed by its ID there)."""
        return self.image

    def claim(self, near: Place | None = None, *, remote: bool = True
              ) -> Lease | RemoteLease | None:
        """A lease at once, or None: from this machine's engine, else (without ``near``,
        and with ``remote``) an idle container a remote node's view shows, claimed without
        waiting for its answer (see :meth:`RemoteNode.claim`)."""
        local = self.cluster.local
        if local is not None and local.ready and (near is None or near.node == local.name):
            pool = local.pools.get(self.image, self.profile)
            lease = pool.claim(near) if pool is not None else None
            if lease is not None or near is not None:
                return lease
        if near is not None or not remote:
            return None
        for node in self.cluster.remote_nodes():
            claimed = node.claim(self)
            if claimed is not None:
                self.last_leased = time.monotonic()
                return claimed
        return None

    @asynccontextmanager
    async def lease(self, near: Place | None = None, *, strict: bool = False,
                    timeout: float = math.inf) -> AsyncIterator[Lease | RemoteLease]:
        """As :meth:`pool.Pool.lease`, on whichever node the rules above choose; a lease
        waiting on a node that is lost goes to another."""
        lease = await self.acquire(near, strict=strict, timeout=timeout)
        try:
            yield lease
        finally:
            lease.release()

    async def acquire(self, near: Place | None = None, *, strict: bool = False,
                      timeout: float = math.inf) -> Lease | RemoteLease:
        self.last_leased = time.monotonic()
        with trio.move_on_after(timeout):
            return await self._acquire(near, strict, trio.current_time() + timeout)
        raise LeaseTimeout(f"no container became free within {timeout:g} s "
                           f"({self.cluster.summary()})")

    async def _acquire(self, near: Place | None, strict: bool, deadline: float
                       ) -> Lease | RemoteLease:
        if near is not None:
            node = self.cluster.node(near.node)
            if node is not None and node.ready:
                try:
                    return await node.lease(self, near, strict, deadline)
                except NodeLost as exc:
                    if strict:
                        raise PoolError(f"the container of that function is gone: {exc}"
                                        ) from None
            elif strict:
                state = node.state if node is not None else "unknown here"
                raise PoolError(f"the container of that function is gone: node {near.node} "
                                f"is {state}")
        failed: dict[Node, str] = {}
        while True:
            chosen = self._choose(failed)
            if chosen is None:
                if not self.cluster.supplying(self.image) and failed:
                    raise PoolError("; ".join(f"node {n.name}: {why}" for n, why in
                                              failed.items()))
                if not self.cluster.supplying(self.image) and self._lacking():
                    raise PoolError(f"image {self.image!r} is not available on any node: "
                                    + "; ".join(self._lacking()))
                await self.cluster.wait_changed()
                continue
            chosen.pending[self.key] += 1
            try:
                lease = await chosen.lease(self, None, False, deadline)
            except ImageUnavailable as exc:
                self.cluster.supply(self.image, chosen, str(exc))
                continue
            except NodeLost:
                continue  # it is not ready any more: the next choice is another node
            except LeaseTimeout:
                raise
            except PoolError as exc:
                failed[chosen] = str(exc)
                continue
            finally:
                chosen.pending[self.key] -= 1
            if near is not None:
                lease.hit = False
            return lease

    def _choose(self, failed: dict[Node, str]) -> Node | None:
        best: Node | None = None
        best_score: tuple = ()
        for node in self.cluster.nodes():
            if not node.ready or node in failed or node.lacks(self.image):
                continue
            stats = node.statistics(self.image, self.profile)
            pending = node.pending[self.key]
            idle = stats.idle if stats else 0
            total = stats.total if stats else 0
            waiting = stats.waiting if stats else 0
            free = min(self.sizes["max"] - total, node.room()) - max(pending - idle, 0)
            score = (idle - pending > 0, free > 0, free, -waiting, node.local)
            if best is None or score > best_score:
                best, best_score = node, score
        return best

    def _lacking(self) -> list[str]:
        return [f"{n.name}: {n.missing[self.image][0]}" for n in self.cluster.nodes()
                if n.ready and n.lacks(self.image)]


# -- nodes ------------------------------------------------------------------------------------

class Node:
    """What the pools across the cluster need of a node, local or remote."""

    local = False
    name: str
    state: str
    url: str | None = None
    error: str | None = None

    def __init__(self) -> None:
        self.pending: collections.Counter[tuple[str, Profile]] = collections.Counter()
        # Images this node lacks and cannot pull: why, and since when.
        self.missing: dict[str, tuple[str, float]] = {}

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def lacks(self, image: str) -> bool:
        said = self.missing.get(image)
        if said is not None and time.monotonic() - said[1] > MISSING_TTL:
            del self.missing[image]
            return False
        return said is not None

    def statistics(self, image: str, profile: Profile) -> PoolStatistics | None:
        raise NotImplementedError

    def room(self) -> int:
        raise NotImplementedError

    async def lease(self, pool: ClusterPool, near: Place | None, strict: bool,
                    deadline: float) -> Lease | RemoteLease:
        raise NotImplementedError

    async def ensure(self, pool: ClusterPool) -> None:
        raise NotImplementedError

    def views(self) -> Iterator[Pool | RemotePool]:
        raise NotImplementedError

    def holds(self, cid: str) -> bool:
        raise NotImplementedError

    def discard(self, cid: str) -> None:
        raise NotImplementedError

    async def image_id(self, image: str) -> str | None:
        raise NotImplementedError

    def export_image(self, image: str) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    async def import_image(self, image: str, chunks: trio.abc.ReceiveChannel[bytes]) -> None:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """This node as ``GET /nodes`` shows it."""
        pools = list(self.views())
        stats = [p.statistics() for p in pools]
        return {
            "name": self.name, "url": self.url, "local": self.local, "state": self.state,
            "error": self.error,
            "last_contact": iso(self.last_contact()),
            "capacity": {"max_containers": self.capacity(),
                         "containers": sum(s.total for s in stats),
                         "idle": sum(s.idle for s in stats), "busy": sum(s.busy for s in stats),
                         "pools": len(pools)},
        }

    def capacity(self) -> int:
        raise NotImplementedError

    def last_contact(self) -> float | None:
        raise NotImplementedError


class LocalNode(Node):
    """This machine's engine, in-process: its pools are the front's own."""

    local = True

    def __init__(self, pools: Pools) -> None:
        super().__init__()
        self.pools = pools
        self.name = pools.node or "local"
        self.state = "ready"
        self._contact = time.time()

    async def watch(self, heartbeat: float) -> None:
        """Keep ``state`` true to whether the engine answers."""
        while True:
            ok = await self.pools.engine.ping(timeout=max(heartbeat, 1.0))
            state = "ready" if ok else "engine down"
            if state != self.state:
                log.warning("local node %s: %s", self.name, state)
            self.state = state
            if ok:
                self._contact = time.time()
            await trio.sleep(heartbeat)

    def statistics(self, image: str, profile: Profile) -> PoolStatistics | None:
        pool = self.pools.get(image, profile)
        return pool.statistics() if pool is not None else None

    def room(self) -> int:
        return self.pools.budget.room()

    def capacity(self) -> int:
        return self.pools.budget.limit

    def last_contact(self) -> float | None:
        return self._contact

    async def _pool(self, pool: ClusterPool) -> Pool:
        try:
            return await self.pools.add(pool.image, pool.profile, configured=pool.configured,
                                         **pool.sizes)
        except PoolError as exc:
            if isinstance(exc.__cause__, ImageMissing):
                raise ImageUnavailable(str(exc)) from exc
            raise

    async def lease(self, pool: ClusterPool, near: Place | None, strict: bool,
                    deadline: float) -> Lease:
        local = await self._pool(pool)
        return await local.acquire(near, strict=strict,
                                   timeout=max(deadline - trio.current_time(), 0))

    async def ensure(self, pool: ClusterPool) -> None:
        await self._pool(pool)

    def views(self) -> Iterator[Pool]:
        return iter(self.pools)

    def holds(self, cid: str) -> bool:
        return self.pools.alive(cid)

    def discard(self, cid: str) -> None:
        self.pools.discard(cid)

    # The engine's failures as a remote node's are: PoolError, which the image streams
    # (Cluster._supply) expect of every node.

    async def image_id(self, image: str) -> str | None:
        try:
            return await self.pools.engine.image_id(image, pull=False)
        except ImageMissing:
            return None
        except EngineError as exc:
            raise PoolError(f"node {self.name}: {exc}") from exc

    async def export_image(self, image: str) -> AsyncGenerator[bytes, None]:
        chunks = self.pools.engine.export_image(image)
        try:
            async for chunk in chunks:
                yield chunk
        except EngineError as exc:
            raise PoolError(f"node {self.name}: cannot export {image}: {exc}") from exc
        finally:
            await chunks.aclose()

    async def import_image(self, image: str, chunks: trio.abc.ReceiveChannel[bytes]) -> None:
        try:
            await self.pools.engine.import_image(chunks)
        except EngineError as exc:
            raise PoolError(f"node {self.name}: cannot load {image}: {exc}") from exc


@dataclass(eq=False)
class _Request:
    done: trio.Event = field(default_factory=trio.Event)
    reply: tuple[dict[str, Any], list[bytes]] | None = None
    error: str | None = None


@dataclass(eq=False)
class _Run:
    output: Output
    credit: Credit = field(default_factory=lambda: Credit(STDIN_WINDOW))
    done: trio.Event = field(default_factory=trio.Event)
    result: Result | None = None
    error: str | None = None


class RemoteNode(Node):
    """A ``ufaas node``, connected to (and again after a loss) until it is unlisted.

    Every wait on it has a deadline: the connection (``connect_timeout``), each send,
    and silence: both ends beat every ``heartbeat``, and ``node_timeout`` seconds without
    a word loses the node. A loss ends its runs as ``error`` (naming it), and sends the
    leases still waiting on it to other nodes.
    """

    def __init__(self, cluster: Cluster, url: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.url = url
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or ""
        self.port = parsed.port or cluster.settings.node_port
        self.name = f"{self.host}:{self.port}"
        self.state = "connecting"
        self.error: str | None = None
        self.timeout = cluster.settings.node_timeout
        self.epoch = 0  # one more for every connection
        self.max_containers = 0
        self._contact: float | None = None
        self._views: dict[tuple[str, Profile], RemotePool] = {}
        self._numbered: dict[int, tuple[str, Profile]] = {}  # a pool's number -> its key
        # Claims sent whose container the node's views may still show idle: until their
        # run ends, their claim fails, or they are released unused.
        self._claims: dict[str, RemoteLease] = {}
        self._ids: dict[str, str] = {}  # an image as the front names it -> its ID there
        self._outbox: Outbox | None = None
        self._requests: dict[str, _Request] = {}
        self._runs: dict[str, _Run] = {}
        self._credits: dict[str, Credit] = {}
        self._inboxes: dict[str, Inbox] = {}
        self._scope = trio.CancelScope()
        self._ended = False  # this connection's loss is told

    def capacity(self) -> int:
        return self.max_containers

    def last_contact(self) -> float | None:
        return self._contact

    def close(self) -> None:
        """Unlisted: disconnect, and connect no more."""
        self._scope.cancel()

    # -- the connection -------------------------------------------------------------------

    async def serve(self) -> None:
        backoff = RECONNECT_MIN
        with self._scope:
            try:
                while True:
                    retry = backoff
                    self._ended = False
                    try:
                        why = await self._connection()
                        backoff = RECONNECT_MIN
                    except ConnectionRejected as exc:
                        body = (exc.body or b"").decode(errors="replace")[:500]
                        why = f"refused this front ({exc.status_code}): {body}"
                        self.state, retry = "refused", REFUSED_RETRY
                    except Refused as exc:
                        why, retry = str(exc), REFUSED_RETRY
                        self.state = "refused"
                    except (HandshakeError, OSError, ConnectionClosed, trio.TooSlowError) as exc:
                        why = f"cannot connect: {type(exc).__name__} {exc}".rstrip()
                        backoff = min(backoff * 2, RECONNECT_MAX)
                    except WireError as exc:
                        why = f"broke the protocol: {exc}"
                    if self._ended:  # lost already; what the closing said does not matter
                        retry = backoff = RECONNECT_MIN
                    else:
                        self._lost(why)
                    await trio.sleep(retry)
            finally:
                # Unlisted (or the front stopping): the node's runs, leases and streams
                # end now, naming it, rather than when their own deadlines do.
                if self._outbox is not None:  # connected still
                    self._lost("disconnected: this front no longer uses it")

    def _lost(self, why: str) -> None:
        was = self.state
        if self.state not in ("refused",):
            self.state = "lost" if self.epoch else "connecting"
        if why != self.error or was == "ready":
            (log.warning if was == "ready" or self.state == "refused" else log.info)(
                "node %s (%s): %s", self.name, self.url, why)
        self.error = why
        self._outbox = None
        reason = f"node {self.name} lost: {why}"
        for request in self._requests.values():
            request.error = reason
            request.done.set()
        for run in self._runs.values():
            run.error = reason
            run.done.set()
        for credit in self._credits.values():
            credit.close()
        for inbox in self._inboxes.values():
            inbox.end(reason)
        self._views.clear()
        self._numbered.clear()
        self._claims.clear()
        self.cluster.changed()

    async def _connection(self) -> str:
        """Connect, greet, then serve the connection; return why it ended."""
        settings = self.cluster.settings
        headers = [(b"authorization", f"Bearer {settings.secret() or ''}".encode()),
                   (PROTOCOL_HEADER.encode(), self.cluster.speaks.encode()),
                   (FRONT_HEADER.encode(), f"{self.cluster.home} {self.cluster.instance}"
                    .encode())]
        why = ""  # the sender may end the connection first: then self.error says why
        # Leaving open_websocket waits for the closing handshake and for its reader task;
        # a node that reads nothing but still sends keeps that task waiting for room in
        # a queue nobody reads now (the close frame never went): bounded below.
        with trio.CancelScope() as leaving:
            async with open_websocket(
                    self.host, self.port, "/", use_ssl=False, extra_headers=headers,
                    max_message_size=settings.max_message, receive_buffer_size=RECEIVE_BUFFER,
                    connect_timeout=settings.connect_timeout,
                    disconnect_timeout=settings.connect_timeout) as ws:
                with trio.fail_after(settings.connect_timeout):
                    hello, _ = unpack(await ws.get_message())
                self._greet(hello)
                outbox = Outbox()
                async with trio.open_nursery() as nursery:
                    self._outbox = outbox
                    self.epoch += 1
                    self.state, self.error = "ready", None
                    log.info("node %s ready (%s)", self.name, self.url)
                    self.cluster.joined(self)
                    nursery.start_soon(self._send_forever, ws, outbox, nursery.cancel_scope)
                    nursery.start_soon(self._beat_forever)
                    why = await self._receive_forever(ws)
                    nursery.cancel_scope.cancel()
                why = why or self.error or "the connection ended"
                # Lost now, before the closing handshake: a hung or cut-off node never
                # answers it, and its runs must not wait disconnect_timeout more to end.
                self._lost(why)
                self._ended = True
                leaving.deadline = trio.current_time() + 2 * settings.connect_timeout
        return why

    def _greet(self, hello: dict[str, Any]) -> None:
        if hello.get("op") != "hello":
            raise WireError("it did not say hello")
        why = mismatch(self.cluster.speaks, str(hello.get("speaks", "")), we="front",
                       they="node")
        if why is not None:
            raise Refused(why)
        name, limit = hello.get("node"), hello.get("max_containers")
        if not isinstance(name, str) or not name or len(name) > 255 or not isinstance(
                limit, int):
            raise WireError("a hello without a name or max_containers")
        self.name, self.max_containers = name, limit
        self._contact = time.time()

    async def _send_forever(self, ws: WebSocketConnection, outbox: Outbox,
                            scope: trio.CancelScope) -> None:
        with contextlib.suppress(ConnectionClosed):
            late = await send_each(outbox, ws.send_message, self.timeout)
            if late is not None:
                self.error = f"it {late}"
        scope.cancel()

    async def _beat_forever(self) -> None:
        while True:
            self.send(message("beat"))
            await trio.sleep(self.cluster.settings.heartbeat)

    async def _receive_forever(self, ws: WebSocketConnection) -> str:
        while True:
            with trio.move_on_after(self.timeout):
                try:
                    data = await ws.get_message()
                except ConnectionClosed as exc:
                    return self.error or f"the connection closed ({exc.reason})"
                self._contact = time.time()
                try:
                    for header, parts in messages(data):
                        self._dispatch(header, parts)
                except WireError as exc:
                    return f"broke the protocol: {exc}"
                continue
            return f"no word from it for {self.timeout:g} s"

    def send(self, data: bytes) -> None:
        """Queue a message to the node; NodeLost when it is not connected."""
        if self._outbox is None:
            raise NodeLost(f"node {self.name} is {self.state}: {self.error}")
        self._outbox.put(data)

    def send_quietly(self, data: bytes, epoch: int | None = None) -> None:
        """Queue a message if the connection (of ``epoch``, when given) still stands."""
        if self._outbox is not None and epoch in (None, self.epoch):
            self._outbox.put(data)

    def released(self, lease: RemoteLease) -> None:
        """``lease`` ran and is given back: the node is told with the next message (see
        Outbox.later), and its container counts as idle here meanwhile, so that the next
        function may claim it (a claim goes behind the release). Should the node not keep
        it (it retired the container, or gave it to a lease waiting there), the claim is
        refused and that function waits for another. The release says whether it was
        counted so: when it was, and the node's pool is then as it last said, the node
        sends no view of it."""
        if self._outbox is None or lease.epoch != self.epoch:
            return
        counted = self._count_idle(lease)
        self._outbox.later(lease.lid, partial(message, "release", lid=lease.lid,
                                              discard=lease.discard, counted=counted))

    def _count_idle(self, lease: RemoteLease) -> bool:
        cid = lease.place.container
        if lease.discard or not lease.reusable:
            return False
        for view in self._views.values():
            if cid in view.containers and cid not in view.idle:
                view.idle.append(cid)  # the one the node gives next
                view.stats = dataclasses.replace(view.stats, idle=view.stats.idle + 1,
                                                 busy=max(view.stats.busy - 1, 0))
                self.cluster.changed()
                return True
        return False

    def _dispatch(self, header: dict[str, Any], parts: list[bytes]) -> None:
        op = header["op"]
        key = header.get("lid") or header.get("rid")
        if key is not None and not isinstance(key, str):
            raise WireError(f"an {op!r} whose id is not a string")
        if op == "beat":
            if not isinstance(header.get("engine"), bool):
                raise WireError("a beat without the engine's state")
            pools = fields_of(header, parts).get("pools")
            if not isinstance(pools, list):
                raise WireError("a beat without its pools")
            self._views, self._numbered = {}, {}
            for view in pools:
                self._keep(view)
            state = "ready" if header["engine"] else "engine down"
            if state != self.state and self.state in ("ready", "engine down"):
                log.warning("node %s: %s", self.name, state)
                self.state = state
                self.cluster.changed()
        elif op == "view":
            self._view_in(header, parts)
            self.cluster.changed()
        elif op == "out" and key in self._runs and "v" in header:  # held, maybe pieces
            for fd, data in _output(fields_of(header, parts).get("out")):
                self._runs[key].output.add(fd, data)
        elif op == "out" and key in self._runs:
            fd = header.get("fd")
            if fd not in (1, 2) or len(parts) != 1:
                raise WireError("output without its stream")
            self._runs[key].output.add(fd, parts[0])
        elif op == "result" and key in self._runs:
            fields = fields_of(header, parts)
            result, out = fields.get("result"), _output(fields.get("out", []))
            if not isinstance(result, Result):
                raise WireError("a result that is not one")
            run = self._runs[key]
            for fd, data in out:  # the output that came with its end
                run.output.add(fd, data)
            run.result = result
            run.done.set()
            self._claims.pop(key, None)  # it ran there: what the node says now counts it
        elif op == "ack" and key in self._runs:
            self._runs[key].credit.give(header.get("bytes"))
        elif op == "ack" and key in self._credits:
            self._credits[key].give(header.get("bytes"))
        elif op == "chunk" and key in self._inboxes:
            self._inboxes[key].put(parts[0] if len(parts) == 1 else b"")
        elif op in ("image_end", "failed") and key in self._inboxes:
            self._inboxes[key].end(str(header.get("error")) if op == "failed" else None)
        elif op == "failed" and key in self._claims:
            lease = self._claims.pop(key)
            lease.refused = f"node {self.name}: {str(header.get('error'))[:2000]}"
            running = self._runs.get(key)
            if running is not None:  # the run was sent behind the claim: it ends here
                running.error = lease.refused
                running.done.set()
            self.cluster.changed()
        elif op in ("leased", "failed", "pool", "image", "imported") and key in self._requests:
            request = self._requests[key]
            request.reply = (header, parts)
            request.done.set()
            if key in self._credits:  # an import that ended: its sender waits no more
                self._credits[key].close()
        elif op in ("out", "result", "ack", "chunk", "image_end", "failed", "leased", "pool",
                    "image", "imported"):
            if op == "leased":  # given up on here: let the node have it back
                self.send_quietly(message("release", lid=key, discard=False))
        else:
            raise WireError(f"an unexpected {op!r}")

    async def _ask(self, rid: str, data: bytes, timeout: float
                   ) -> tuple[dict[str, Any], list[bytes]]:
        """Send a request, and wait up to ``timeout`` seconds for its answer."""
        request = self._requests[rid] = _Request()
        try:
            self.send(data)
            with trio.move_on_after(timeout):
                await request.done.wait()
        finally:
            del self._requests[rid]
        if request.error is not None:
            raise NodeLost(request.error)
        if request.reply is None:
            raise PoolError(f"node {self.name} did not answer within {timeout:g} s")
        return request.reply

    # -- what the pools ask of it ---------------------------------------------------------

    def statistics(self, image: str, profile: Profile) -> PoolStatistics | None:
        view = self._views.get((self._ids.get(image, ""), profile))
        return view.stats if view is not None else None

    def room(self) -> int:
        return self.max_containers - sum(v.stats.total for v in self._views.values())

    def claim(self, pool: ClusterPool) -> RemoteLease | None:
        """An idle container of ``pool`` that this node's view shows (and that no lease on
        its way there may get), claimed at once, or None. The claim is sent now, so the
        node takes that container before it reads anything sent later; the run goes right
        behind it, without waiting for an answer: no round trip before a function starts.
        Should the container have gone meanwhile, the node says so and the run ends
        ``error``, as a claimed container that dies does on this machine."""
        view = self._views.get((self._ids.get(pool.image, ""), pool.profile))
        if (not self.ready or self._outbox is None or view is None
                or view.stats.idle - self.pending[pool.key] <= 0):
            return None
        taken = {lease.place.container for lease in self._claims.values()}
        cid = next((c for c in reversed(view.idle) if c not in taken), None)
        if cid is None:
            return None
        lid, workdir = uuid.uuid4().hex, uuid.uuid4().hex
        lease = self._claims[lid] = RemoteLease(self, lid, self.epoch,
                                                Place(cid, workdir, self.name), None)
        lease.claim = {"pool": view.number, "container": cid, "workdir": workdir}
        # As the node will count it; its answer says what it did.
        view.stats = dataclasses.replace(view.stats, idle=view.stats.idle - 1,
                                         busy=view.stats.busy + 1)
        view.idle = [c for c in view.idle if c != cid]
        return lease

    def _keep(self, said: Any) -> RemotePool:
        """A pool's full view, numbered as the node numbers it."""
        view = RemotePool.of(self.name, said)
        number = said.get("number")
        if type(number) is not int:
            raise WireError("a pool view without its number")
        view.number = number
        self._views[(view.image, view.profile)] = view
        self._numbered[number] = (view.image, view.profile)
        return view

    def _view_in(self, header: dict[str, Any], parts: list[bytes]) -> RemotePool | None:
        """The pool a message is about, its view updated: in full, or its counters alone
        (None when that pool is unknown here: one that closed, then said its last)."""
        if "counts" not in header:
            return self._keep(fields_of(header, parts).get("pool"))
        number = header.get("pool")
        key = self._numbered.get(number) if type(number) is int else None
        view = self._views.get(key) if key is not None else None
        if view is not None:
            view.stats = with_counts(view.stats, header["counts"])
            view.idle = _ids(header.get("idle"))
        return view

    def _learn(self, pool: ClusterPool, header: dict[str, Any], parts: list[bytes]) -> None:
        """What a node's answer about ``pool`` says of it; PoolError if it does not hold."""
        try:
            view = self._view_in(header, parts)
        except WireError as exc:
            raise PoolError(f"node {self.name} broke the protocol: {exc}") from None
        if view is not None:
            self._ids[pool.image] = view.image

    def _pool_message(self, op: str, pool: ClusterPool, near: Place | None = None,
                      **plain: Any) -> bytes:
        return message(op, {"profile": pool.profile, "near": near}, image=pool.image,
                       configured=pool.configured, sizes=pool.sizes, **plain)

    async def lease(self, pool: ClusterPool, near: Place | None, strict: bool,
                    deadline: float) -> RemoteLease:
        lid, epoch = uuid.uuid4().hex, self.epoch
        wait = max(deadline - trio.current_time(), 0)
        try:
            header, parts = await self._ask(lid, self._pool_message(
                "lease", pool, near, lid=lid, strict=strict, timeout=wait), wait + self.timeout)
        except BaseException:
            # Cancelled, or given up on: the node must not keep it for us.
            self.send_quietly(message("release", lid=lid, discard=False), epoch)
            raise
        if header["op"] == "failed":
            _raise_failed(self.name, header)
        container, workdir = header.get("container"), header.get("workdir")
        try:
            self._learn(pool, header, parts)
            if not isinstance(container, str) or not isinstance(workdir, str):
                raise PoolError(f"node {self.name} broke the protocol: a lease without "
                                "its container")
        except PoolError:  # the node holds it all the same: let it go
            self.send_quietly(message("release", lid=lid, discard=False), epoch)
            raise
        hit = header.get("hit")
        return RemoteLease(self, lid, epoch, Place(container, workdir, self.name),
                           hit if isinstance(hit, bool) else None)

    async def ensure(self, pool: ClusterPool) -> None:
        rid = uuid.uuid4().hex
        header, parts = await self._ask(rid, self._pool_message("pool", pool, rid=rid),
                                        self.cluster.config.engine_timeout + self.timeout)
        if header["op"] == "failed":
            _raise_failed(self.name, header)
        self._learn(pool, header, parts)

    def views(self) -> Iterator[RemotePool]:
        return iter(list(self._views.values()) if self.ready else [])

    def holds(self, cid: str) -> bool:
        return any(cid in v.containers for v in self._views.values())

    def discard(self, cid: str) -> None:
        self.send_quietly(message("discard", container=cid))

    async def image_id(self, image: str) -> str | None:
        rid = uuid.uuid4().hex
        header, _ = await self._ask(rid, message("image_has", rid=rid, image=image),
                                    self.cluster.config.engine_timeout + self.timeout)
        found = header.get("id")
        return found if isinstance(found, str) else None

    async def export_image(self, image: str) -> AsyncGenerator[bytes, None]:
        rid, epoch = uuid.uuid4().hex, self.epoch
        inbox = self._inboxes[rid] = Inbox(IMAGE_WINDOW, lambda size: self.send_quietly(
            message("ack", rid=rid, bytes=size), epoch))
        try:
            self.send(message("image_export", rid=rid, image=image))
            async for chunk in inbox:
                yield chunk
            if inbox.error is not None:
                raise PoolError(inbox.error)
        finally:
            del self._inboxes[rid]
            self.send_quietly(message("image_cancel", rid=rid), epoch)

    async def import_image(self, image: str, chunks: trio.abc.ReceiveChannel[bytes]) -> None:
        rid, epoch = uuid.uuid4().hex, self.epoch
        credit = self._credits[rid] = Credit(IMAGE_WINDOW)
        request = self._requests[rid] = _Request()
        try:
            self.send(message("image_import", rid=rid, image=image))
            async for chunk in chunks:
                await credit.take(len(chunk))
                if request.done.is_set():  # the node failed it (or was lost): no more
                    break
                self.send(pack({"op": "chunk", "rid": rid}, [chunk]))
            else:
                self.send(message("image_end", rid=rid))
            await request.done.wait()  # the caller's deadline: image_timeout
        finally:
            del self._credits[rid], self._requests[rid]
            if not request.done.is_set():  # given up on: the node stops loading it
                self.send_quietly(message("image_cancel", rid=rid), epoch)
        if request.error is not None:
            raise NodeLost(request.error)
        assert request.reply is not None
        if request.reply[0]["op"] == "failed":
            raise PoolError(str(request.reply[0].get("error")))


def _output(said: object) -> list[list[Any]]:
    """Output a node held and sent in one piece: ``[[fd, bytes], ...]``, or WireError."""
    if not isinstance(said, list) or not all(
            isinstance(o, list) and len(o) == 2 and o[0] in (1, 2)
            and isinstance(o[1], bytes) for o in said):
        raise WireError("output that is not [stream, bytes] pairs")
    return said


class Refused(Exception):
    """The node and this front cannot work together (a version mismatch)."""


def _raise_failed(node: str, header: dict[str, Any]) -> None:
    error = f"node {node}: {str(header.get('error'))[:2000]}"
    kind = header.get("kind")
    if kind == "image":
        raise ImageUnavailable(error)
    if kind == "timeout":
        raise LeaseTimeout(error)
    raise PoolError(error)


# The outcomes after which a node's pool keeps the container (a function killed at its
# deadline or on a cancel leaves it to the next); after an error it is the node's to judge.
REUSABLE = frozenset({"exited", "timeout", "cancelled"})


class RemoteLease:
    """A container held on a remote node, as :class:`pool.Lease` is on this one."""

    def __init__(self, node: RemoteNode, lid: str, epoch: int, place: Place,
                 hit: bool | None) -> None:
        self.node = node
        self.lid = lid
        self.epoch = epoch
        self.place = place
        self.hit = hit
        self.discard = False
        self.refused: str | None = None  # why the node refused its claim
        # A container chosen from the node's view, claimed with the run (one message).
        self.claim: dict[str, Any] | None = None
        self._ran = False
        self._released = False
        self.reusable: bool | None = None  # once it ran: whether its container may be again

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.node._claims.pop(self.lid, None)
            if self.claim is not None:  # never sent: the node knows nothing of it
                return
            if self.reusable is not None:  # it ran: nobody waits for the release
                self.node.released(self)
                return
            self.node.send_quietly(message("release", lid=self.lid, discard=self.discard),
                                   self.epoch)

    async def run(self, job: Job, on_output: Any = None, stdin: Any = None,
                  on_file: OnFile | None = None) -> Result:
        """As :meth:`pool.Lease.run`. The output is capped here too, whatever the node
        sends; a lost node ends the run as ``error``, naming it. On cancellation the node
        is told to kill the function, and its answer awaited (shielded, bounded) before
        Cancelled propagates. Output files come in the node's result, and go to
        ``on_file`` from there."""
        if self._ran:
            raise RuntimeError("a lease runs one function")
        self._ran = True
        node = self.node
        run = _Run(Output(job.output_cap, on_output))
        if node.epoch != self.epoch or node._outbox is None:  # its run never went:
            raise Unclaimed(f"node {node.name} lost before the run went: {node.error}")
        if self.refused is not None:
            raise Unclaimed(self.refused)
        data = message("run", {"job": job}, lid=self.lid, live=stdin is not None,
                       **(self.claim or {}))
        limit = node.cluster.settings.max_message
        if len(data) > limit:
            return Result("error", place=self.place, error=f"the function's files and stdin "
                          f"come to {len(data)} bytes: more than one message to a node may "
                          f"hold (cluster.max_message, {limit})")
        node._runs[self.lid] = run
        try:
            node.send(data)
            self.claim = None  # sent: the node holds it now
            async with trio.open_nursery() as nursery:
                if stdin is not None:
                    nursery.start_soon(self._feed, stdin, run)
                with trio.move_on_after(job.timeout + KILL_GRACE + node.timeout):
                    await run.done.wait()
                if not run.done.is_set():  # given up on: it must not run on there
                    node.send_quietly(message("cancel", lid=self.lid), self.epoch)
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(KILL_GRACE + node.timeout):
                node.send_quietly(message("cancel", lid=self.lid), self.epoch)
                await run.done.wait()
            if run.result is not None:
                self.reusable = run.result.outcome in REUSABLE
            raise
        finally:
            node._runs.pop(self.lid, None)
        if self.refused is not None and run.result is None:
            raise Unclaimed(self.refused)  # the node refused its claim: nothing ran
        result = run.result
        if result is None:
            result = Result("error", error=run.error or f"node {node.name} did not say how "
                            "the function ended")
        elif result.outcome == "error":
            result.error = f"node {node.name}: {result.error}"
        result.place = self.place
        self.reusable = result.outcome in REUSABLE
        if on_file is not None:
            for kept in result.files:
                data, kept.data = kept.data or b"", None
                await on_file(kept.path, b"")
                for i in range(0, len(data), FILE_CHUNK):
                    await on_file(kept.path, data[i:i + FILE_CHUNK])
        return run.output.fill(result)

    async def _feed(self, stdin: trio.abc.ReceiveChannel[bytes], run: _Run) -> None:
        try:
            async for chunk in stdin:
                for i in range(0, len(chunk), STDIN_CHUNK):
                    piece = chunk[i:i + STDIN_CHUNK]
                    await run.credit.take(len(piece))
                    self.node.send(pack({"op": "stdin", "lid": self.lid}, [piece]))
            self.node.send(pack({"op": "stdin", "lid": self.lid, "eof": True}))
        except NodeLost:
            pass  # the run ends with the node's loss


# -- the cluster ------------------------------------------------------------------------------

class Cluster:
    """The front's nodes and the pools across them, offering the scheduler what
    :class:`pool.Pools` offers. Run with ``await nursery.start(cluster.serve)``."""

    def __init__(self, config: Config, local: Pools | None, *, home: str, instance: str,
                 speaks_as: str | None = None) -> None:
        """``local``: this machine's pools, a node too (None: the front runs nothing
        itself). ``speaks_as`` replaces what this front says it speaks (tests)."""
        self.config = config
        self.settings = config.cluster
        self.home = home
        self.instance = instance
        self.speaks = speaks_as or speaks()
        self.local_pools = local
        self.local: LocalNode | None = None
        self._remote: dict[str, RemoteNode] = {}
        self._pools: dict[tuple[str, Profile], ClusterPool] = {}
        self._supplies: set[tuple[str, str]] = set()
        self._change = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.local_pools is not None:
                pools = self.local_pools
                if not pools.node:
                    pools.node = self.settings.name or await self._engine_name(pools)
                self.local = LocalNode(pools)
                await nursery.start(pools.serve)
                nursery.start_soon(self.local.watch, self.settings.heartbeat)
            nursery.start_soon(self._discover_forever)
            nursery.start_soon(self._reap_forever)
            task_status.started(self)

    @staticmethod
    async def _engine_name(pools: Pools) -> str:
        try:
            return str((await pools.engine.info()).get("Name") or socket.gethostname())
        except Exception:  # noqa: BLE001 - any engine trouble: the host's name will do
            return socket.gethostname()

    def nodes(self) -> list[Node]:
        found: list[Node] = [self.local] if self.local is not None else []
        return found + list(self._remote.values())

    def remote_nodes(self) -> Iterator[RemoteNode]:
        return iter(self._remote.values())

    def node(self, name: str | None) -> Node | None:
        """The node of that name, a ready one first."""
        named = [n for n in self.nodes() if n.name == name]
        return next((n for n in named if n.ready), named[0] if named else None)

    def changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_changed(self) -> None:
        await self._change.wait()

    def summary(self) -> str:
        return ", ".join(f"{n.name} {n.state}" for n in self.nodes()) or "no node"

    def joined(self, node: RemoteNode) -> None:
        """A node connected: it gets the configured pools, and waiting leases may go there.
        It may hold an image that another node lacked when no node had it: ask again."""
        assert self._nursery is not None
        for pool in list(self._pools.values()):
            if pool.configured:
                self._nursery.start_soon(self._ensure, node, pool)
        for other in self.nodes():
            if other is not node and other.ready:
                for image, (why, _) in list(other.missing.items()):
                    if why == NO_HOLDER:
                        self.supply(image, other, why)
        self.changed()

    async def _ensure(self, node: Node, pool: ClusterPool) -> None:
        try:
            await node.ensure(pool)
        except ImageUnavailable as exc:
            self.supply(pool.image, node, str(exc))
        except PoolError as exc:
            log.warning("pool %s not started on node %s: %s", pool.image, node.name, exc)

    # -- what Pools offers ----------------------------------------------------------------

    async def add(self, image: str, profile: Profile | None = None, *,
                  configured: bool = False, **settings: Any) -> ClusterPool:
        """The pool of ``image`` and ``profile`` across the nodes. A configured one is
        started on every node (and on nodes that join later)."""
        profile = profile or Profile()
        sizes = {"min_idle": self.config.min_idle, "max": self.config.max,
                 "idle_ttl": self.config.idle_ttl, **settings}
        key = (image, profile)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ClusterPool(self, image, profile, configured, sizes)
        elif configured and not pool.configured:
            pool.configured, pool.sizes = True, sizes
        else:
            return pool
        if configured and self._nursery is not None:
            for node in self.nodes():
                if node.ready:
                    self._nursery.start_soon(self._ensure, node, pool)
        return pool

    def get(self, image: str, profile: Profile | None = None) -> ClusterPool | None:
        return self._pools.get((image, profile or Profile()))

    def alive(self, cid: str) -> bool:
        return any(n.ready and n.holds(cid) for n in self.nodes())

    def discard(self, cid: str) -> None:
        for node in self.nodes():
            if node.holds(cid):
                node.discard(cid)

    def __iter__(self) -> Iterator[Pool | RemotePool]:
        for node in self.nodes():
            yield from node.views()

    def status(self) -> list[dict[str, Any]]:
        return [node.status() for node in self.nodes()]

    async def healthy(self) -> bool:
        return any(node.ready for node in self.nodes())

    # -- finding nodes --------------------------------------------------------------------

    async def _discover_forever(self) -> None:
        assert self._nursery is not None
        while True:
            urls = await self._find()
            if urls is not None:
                for url in sorted(urls - set(self._remote)):
                    node = self._remote[url] = RemoteNode(self, url)
                    self._nursery.start_soon(node.serve)
                for url in set(self._remote) - urls:
                    log.info("node %s (%s) is no longer listed", self._remote[url].name, url)
                    self._remote.pop(url).close()
                    self.changed()
            if not self.settings.swarm_service:
                return  # a static list: found once
            await trio.sleep(self.settings.discovery_interval)

    async def _find(self) -> set[str] | None:
        """The nodes' URLs; None when they cannot be told now (keep those known)."""
        if not self.settings.swarm_service:
            return set(self.settings.nodes)
        name, port = f"tasks.{self.settings.swarm_service}", self.settings.node_port
        try:
            with trio.fail_after(self.settings.connect_timeout):
                found = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                return set()  # the service has no task
            log.info("cannot look up %s: %s", name, exc)
            return None
        except trio.TooSlowError:
            return None
        urls = set()
        for family, *_, address in found:
            host = str(address[0])
            urls.add(f"ws://[{host}]:{port}" if family == socket.AF_INET6 else
                     f"ws://{host}:{port}")
        return urls

    async def _reap_forever(self) -> None:
        """Forget pools not configured that nobody leased for their ``idle_ttl``: any image
        name a caller sends makes one."""
        while True:
            await trio.sleep(REAP_EVERY)
            now = time.monotonic()
            for key, pool in list(self._pools.items()):
                if not pool.configured and now - pool.last_leased > pool.sizes["idle_ttl"]:
                    del self._pools[key]

    # -- images ---------------------------------------------------------------------------

    def supplying(self, image: str) -> bool:
        return any(i == image for _, i in self._supplies)

    def supply(self, image: str, target: Node, why: str) -> None:
        """``target`` lacks ``image`` and cannot pull it: stream it there from a node that
        has it, once, in the background."""
        target.missing[image] = (why, time.monotonic())
        key = (target.name, image)
        if key in self._supplies or self._nursery is None:
            return
        self._supplies.add(key)
        self._nursery.start_soon(self._supply, image, target, key)

    async def _supply(self, image: str, target: Node, key: tuple[str, str]) -> None:
        try:
            source = await self._holder(image, target)
            if source is None:
                target.missing[image] = (NO_HOLDER, time.monotonic())
                log.warning("image %s: node %s lacks it, and no node has it", image,
                            target.name)
                return
            with trio.fail_after(self.settings.image_timeout):
                size = await self._stream(image, source, target)
            target.missing.pop(image, None)
            log.info("image %s: streamed from %s to %s, %.1f MiB", image, source.name,
                     target.name, size / MiB)
            # Its configured pools could not start there without it: now they can.
            assert self._nursery is not None
            for pool in list(self._pools.values()):
                if pool.configured and pool.image == image:
                    self._nursery.start_soon(self._ensure, target, pool)
        except (PoolError, trio.TooSlowError) as exc:
            why = f"streaming it failed: {exc or 'took longer than image_timeout'}"
            target.missing[image] = (why, time.monotonic())
            log.warning("image %s to node %s: %s", image, target.name, why)
        finally:
            self._supplies.discard(key)
            self.changed()

    async def _holder(self, image: str, target: Node) -> Node | None:
        """A ready node other than ``target`` that has ``image``, asked all at once."""
        holders: list[Node] = []

        async def ask(node: Node) -> None:
            try:
                if await node.image_id(image) is not None:
                    holders.append(node)
            except PoolError:
                pass

        async with trio.open_nursery() as nursery:
            for node in self.nodes():
                if node is not target and node.ready:
                    nursery.start_soon(ask, node)
        return holders[0] if holders else None

    async def _stream(self, image: str, source: Node, target: Node) -> int:
        """``docker save`` on ``source`` into ``docker load`` on ``target``, within
        ``image_max_bytes``, its progress in the log; the bytes it took. PoolError when
        either end fails or the image is too big: then the target gets an archive that
        ends early, which it refuses to load, so nothing is left half-loaded."""
        limit = self.settings.image_max_bytes
        log.info("image %s: %s lacks it, streaming it from %s", image, target.name,
                 source.name)
        send, receive = trio.open_memory_channel[bytes](4)
        size, said = 0, time.monotonic()
        failed: list[PoolError] = []

        async def load() -> None:
            async with receive:  # a failed load stops the sending at once
                try:
                    await target.import_image(image, receive)
                except PoolError as exc:
                    failed.append(exc)

        # Errors are kept, not raised, inside the nursery: raised there they would come
        # out as an exception group, which no caller here expects.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            async with send, contextlib.aclosing(source.export_image(image)) as chunks:
                try:
                    async for chunk in chunks:
                        size += len(chunk)
                        if size > limit:
                            failed.insert(0, PoolError(
                                f"image {image} is more than image_max_bytes ({limit})"))
                            break
                        await send.send(chunk)
                        if time.monotonic() - said > PROGRESS_EVERY:
                            said = time.monotonic()
                            log.info("image %s to %s: %.1f MiB so far", image, target.name,
                                     size / MiB)
                except PoolError as exc:
                    failed.insert(0, exc)
                except trio.BrokenResourceError:
                    pass  # the load failed: it says why
        if failed:
            raise failed[0]
        return size


# What the scheduler and its functions hold, with or without a cluster.
AnyLease = Lease | RemoteLease
AnyPool = Pool | ClusterPool
AnyPools = Pools | Cluster
