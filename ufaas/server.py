"""The composition root: builds the store, the engine, the pools, the scheduler and the HTTP
app from one Config, and runs them nested by lifetime (the scheduler outlives HTTP).

Shutdown: the trigger stops HTTP, running functions get ``shutdown_grace`` seconds, then
the scheduler is cancelled and every container is removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from pool import Engine, Pools

from .api import create_app
from .callbacks import Callbacks
from .cluster import AnyPools, Cluster, LocalNode
from .config import Config
from .fetch import Downloader
from .files import FileStore
from .live import Hub
from .metrics import Metrics
from .parser import Parser
from .scheduler import Scheduler
from .spec import summarize
from .store import Store

log = logging.getLogger("ufaas")

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# Bounds on the last steps of a shutdown, after the functions' own grace.
HTTP_GRACE = 5.0
ENGINE_CLOSE = 5.0


class InsecureBind(Exception):
    """Listening beyond loopback without a token."""


def home(db: str) -> str:
    """The name of the state a server belongs to: containers of another server with the same
    database are its own, left by an earlier run."""
    return hashlib.sha256(str(db).encode()).hexdigest()[:16]


def return_big_buffers() -> None:
    """Have glibc give memory of 1 MiB and more back to the system as soon as it is freed.

    Its default raises that threshold to the biggest block freed so far (up to 32 MiB), so
    after one big request body every later one is carved from a heap that never shrinks:
    a server that takes 64 MiB bodies would keep hundreds of MB it no longer uses.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


@dataclass
class Service:
    """Everything one server is made of, built from one Config and nothing else."""

    store: Store
    engine: Engine | None  # None: a front whose nodes are all remote
    pools: AnyPools
    downloader: Downloader
    files: FileStore
    callbacks: Callbacks
    scheduler: Scheduler
    metrics: Metrics
    app: QuartTrio

    @classmethod
    def build(cls, config: Config, *, instance: str | None = None,
              labels: dict[str, str] | None = None) -> Service:
        """The parts, made but not running (nothing is called yet); close ``store``.

        Without a ``cluster`` section the pools are this engine's alone, as they always
        were; with one, a :class:`~ufaas.cluster.Cluster` spreads them over the nodes (this
        engine among them unless ``cluster.local`` is false)."""
        store = Store(config.db, summarize=summarize)
        cluster = config.cluster
        engine = local = None
        if not cluster.enabled or cluster.local:
            engine = Engine(config.docker_host, call_timeout=config.engine_timeout)
            local = Pools(engine, home=home(config.db), instance=instance,
                          labels={**config.labels, **(labels or {})},
                          max_containers=config.max_containers, min_idle=config.min_idle,
                          max=config.max, idle_ttl=config.idle_ttl)
        downloader = Downloader(max_bytes=config.download_max_bytes,
                                timeout=config.download_timeout, allow=config.fetch_allow,
                                proxy=config.fetch_proxy)
        files = FileStore(config.files_root(), max_bytes=config.files_max_bytes,
                          retention=config.files_retention)
        callbacks = Callbacks(store, secret=config.callback_secret,
                              timeout=config.callback_timeout,
                              attempts=config.callback_attempts, backoff=config.callback_backoff,
                              allow=config.fetch_allow, proxy=config.fetch_proxy)
        pools: AnyPools
        if cluster.enabled:
            pools = Cluster(config, local, home=home(config.db),
                            instance=local.instance if local else instance or uuid.uuid4().hex[:12])
            healthy, nodes = pools.healthy, pools.status
        else:
            assert engine is not None and local is not None
            pools, healthy = local, engine.ping
            only = local

            def nodes() -> list[dict]:
                return [LocalNode(only).status()]
        scheduler = Scheduler(config, store, pools, downloader,
                              Hub(max_bytes=config.stream_buffer), Parser(config), files,
                              callbacks)
        metrics = Metrics(scheduler)
        return cls(store, engine, pools, downloader, files, callbacks, scheduler, metrics,
                   create_app(scheduler, config, healthy=healthy, metrics=metrics, nodes=nodes))


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    instance: str | None = None,
    labels: dict[str, str] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or cancellation); ``started`` gets the URL."""
    if not config.is_loopback() and not config.token and not config.insecure:
        raise InsecureBind(f"refusing to listen on {config.host} without a token: set "
                           "--token (or UFAAS_TOKEN), or pass --insecure")
    return_big_buffers()
    service = Service.build(config, instance=instance, labels=labels)
    try:
        await _serve_http(config, service, shutdown_trigger, task_status)
    finally:
        service.store.close()
        service.files.close()
        with trio.CancelScope(shield=True), trio.move_on_after(ENGINE_CLOSE):
            await service.downloader.aclose()
            if service.engine is not None:
                await service.engine.aclose()


async def _serve_http(config: Config, service: Service,
                      shutdown_trigger: Callable[[], Awaitable[None]] | None,
                      task_status: trio.TaskStatus[str]) -> None:
    scheduler, app = service.scheduler, service.app
    hconfig = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hconfig.bind = [f"{host}:{config.port}"]
    hconfig.accesslog = None
    hconfig.graceful_timeout = HTTP_GRACE
    # Counted from the connection (or the last answer) to a request's complete head, so
    # it bounds a client that trickles its headers as well as an idle one.
    hconfig.keep_alive_timeout = config.header_timeout
    stop_http = trio.Event()

    # Nested by lifetime: functions end (and are recorded) before their pools go.
    async with trio.open_nursery() as outer:
        await outer.start(service.pools.serve)
        await outer.start(scheduler.parser.serve)
        await service.files.open()
        outer.start_soon(service.files.sweep_forever)
        # Callbacks go on while functions drain, and stop with the pools.
        await outer.start(service.callbacks.serve)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(scheduler.serve)
                binds = await nursery.start(partial(
                    hypercorn_serve, app, hconfig,
                    shutdown_trigger=stop_http.wait, mode="asgi"))
                url = binds[0].replace("0.0.0.0", "127.0.0.1") if binds else ""
                log.info("ufaas ready at %s", url)
                task_status.started(url)
                try:
                    if shutdown_trigger is not None:
                        await shutdown_trigger()
                    else:
                        await trio.sleep_forever()
                finally:
                    stop_http.set()
                    with trio.CancelScope(shield=True):
                        await scheduler.drain(config.shutdown_grace)
                    nursery.cancel_scope.cancel()
        finally:
            outer.cancel_scope.cancel()
