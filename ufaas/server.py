"""Runs the service and its HTTP server, nested by lifetime: the service outlives HTTP.

Shutdown: the trigger stops HTTP, running functions get ``shutdown_grace`` seconds, then
the service is cancelled and every container is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import FastPath, create_app
from .config import Config
from .service import Service

log = logging.getLogger("ufaas")


class InsecureBind(Exception):
    """Listening beyond loopback without a token."""


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
    service = Service(config, instance=instance, labels=labels)
    hconfig = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hconfig.bind = [f"{host}:{config.port}"]
    hconfig.accesslog = None
    hconfig.graceful_timeout = 5.0
    hconfig.keep_alive_timeout = 75.0
    stop_http = trio.Event()

    async def http_trigger() -> None:
        await stop_http.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        app = FastPath(create_app(service), service)
        binds = await nursery.start(partial(hypercorn_serve, app, hconfig,
                                            shutdown_trigger=http_trigger, mode="asgi"))
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
                await service.drain(config.shutdown_grace)
            nursery.cancel_scope.cancel()
