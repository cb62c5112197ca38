"""The HTTP API, every route on Quart-Trio: requests become :class:`~ufaas.scheduler.Scheduler`
calls and answers are shaped here; the WebSocket route hands its socket to :mod:`ufaas.ws`.

Every error is JSON ``{"error": message, "detail": ...}`` with a 4xx status naming the
problem; nothing a caller sends may produce a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import mimetypes
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from quart import Response, g, request, websocket
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from pool import Profile

from .config import Config
from .files import Gone
from .piston import PISTON_PREFIX, piston_api
from .scheduler import Conflict, NotFound, QueueFull, Scheduler
from .spec import BadJSON, SpecError
from .store import STATUSES, Record
from .ws import serve_socket

log = logging.getLogger("ufaas")

JSON_TYPE = "application/json"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, detail: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.detail = message, status, detail


def error(status: int, message: str, detail: Any = None,
          headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message, "detail": detail})
    return Response(body, status=status, content_type=JSON_TYPE, headers=headers)


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def number(args: Mapping[str, str], name: str, default: float | None, *, lo: float,
           hi: float) -> float | None:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be a number, not {raw[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"query parameter {name!r} must be between {lo:g} and {hi:g}")
    return value


def flag(args: Mapping[str, str], name: str) -> bool:
    raw = args.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise BadRequest(f"query parameter {name!r} must be true or false")


def choice(args: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    raw = args.get(name, "")
    if raw not in allowed:
        raise BadRequest(f"query parameter {name!r} must be "
                         + " or ".join(repr(a) for a in allowed if a))
    return raw


def authorized(token: bytes, authorization: str, args: Mapping[str, str], *,
               bare: bool = False) -> bool:
    """A bearer token in the Authorization header, else ``?token=`` (the first one); with
    ``bare``, also the token alone in the header, as Piston's clients send their key."""
    if not token:
        return True
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110)
        given = credentials.strip()
    elif bare and authorization:
        given = authorization.strip()
    else:
        given = args.get("token", "")
    return hmac.compare_digest(given.encode(errors="replace"), token)


async def body() -> bytes:
    """The request body, read whole (Quart enforces MAX_CONTENT_LENGTH and BODY_TIMEOUT)."""
    data = await request.get_data(cache=False, as_text=False)
    g.body_read = True
    assert isinstance(data, bytes)
    return data


def profile_view(p: Profile) -> dict[str, Any]:
    return {"memory": p.memory, "cpus": p.cpus, "pids": p.pids, "network": p.network,
            "user": p.user, "workdir_size": p.workdir_size, "tmp_size": p.tmp_size,
            "zygote": p.zygote, "preload": list(p.preload)}


class _Connection(TrioASGIHTTPConnection):
    """Quart-Trio's handling of one HTTP request, answered whole and with two steps less:

    - the request is handled in the task hypercorn gave it; only the body and a disconnect
      are watched by a task of their own;
    - once started, the answer is sent shielded (within ``send_timeout``): hypercorn closes
      a ``Connection: close`` connection from inside that send, and Quart-Trio's watcher,
      seeing the disconnect this causes, would cancel it half-way, leaving it open;
    - a body held in memory goes with the end of the response (two ASGI messages, not
      three).
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            response = await self.app.handle_request(request)
            with trio.CancelScope(shield=True) as answering:
                answering.deadline = trio.current_time() + self.app.config["SEND_TIMEOUT"]
                await self._send_response(send, response)
            nursery.cancel_scope.cancel()

    async def _send_response(self, send: Any, response: Any) -> None:
        body = getattr(response, "response", None)
        if not isinstance(body, DataBody):
            return await super()._send_response(send, response)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": encode_headers(response.headers)})
        await send({"type": "http.response.body", "body": body.data[body.begin:body.end],
                    "more_body": False})


class _App(QuartTrio):
    asgi_http_class = _Connection


def create_app(scheduler: Scheduler, config: Config,
               healthy: Callable[[], Awaitable[bool]]) -> QuartTrio:
    app = _App("ufaas")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = config.body_timeout
    app.config["SEND_TIMEOUT"] = config.send_timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    token = (config.token or "").encode()

    @app.before_request
    async def check_token() -> Response | None:
        piston = request.path.startswith(PISTON_PREFIX)
        if not authorized(token, request.headers.get("Authorization", ""), request.args,
                          bare=piston):
            if piston:  # errors as Piston shapes them
                return Response(json.dumps({"message": "missing or wrong token"}), 401,
                                content_type=JSON_TYPE)
            return error(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    async def close_if_body_unread(response: Response) -> Response:
        # A body we never read (refused before reading it, or sent where none belongs)
        # would stall the client's next request on this connection: close it instead.
        if not g.get("body_read") and (request.content_length
                                       or "Transfer-Encoding" in request.headers):
            response.headers["Connection"] = "close"
        return response

    @app.before_websocket
    async def check_ws_token() -> Response | None:
        if not authorized(token, websocket.headers.get("Authorization", ""), websocket.args,
                          bare=websocket.path.startswith(PISTON_PREFIX)):
            return error(401, "missing or wrong token")
        return None

    @app.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> Response:
        return error(exc.status, exc.message, exc.detail)

    @app.errorhandler(BadJSON)
    async def bad_json(exc: BadJSON) -> Response:
        return error(400, str(exc))

    @app.errorhandler(SpecError)
    async def bad_spec(exc: SpecError) -> Response:
        return error(422, exc.message, exc.errors)

    @app.errorhandler(NotFound)
    async def not_found(exc: NotFound) -> Response:
        return error(404, str(exc))

    @app.errorhandler(Conflict)
    async def conflict(exc: Conflict) -> Response:
        return error(409, str(exc))

    @app.errorhandler(Gone)
    async def gone(exc: Gone) -> Response:
        return error(410, str(exc))

    @app.errorhandler(QueueFull)
    async def queue_full(exc: QueueFull) -> Response:
        return error(429, f"queue full: {exc}", headers={"Retry-After": "1"})

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    async def internal(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error", type(exc).__name__)

    def wait_arg() -> float | None:
        return number(request.args, "wait", None, lo=0, hi=config.max_wait)

    async def submit(after: str | None) -> Response:
        args = request.args
        strict = flag(args, "strict") if after is not None else False
        wait = wait_arg()  # a bad query refuses the request before anything is queued
        raw = await body()
        function = await scheduler.submit(raw, after=after, strict=strict)
        headers = {"Location": f"/fn/{function.id}"}
        record = function.record
        if wait:
            record = await scheduler.wait(function.id, wait)
            if record.finished:
                return reply(record.public(), 200, headers)
        return reply(record.public(), 202, headers)

    @app.get("/fn")
    async def list_functions() -> Response:
        args = request.args
        status = args.get("status")
        if status is not None and status != "all" and status not in STATUSES:
            raise BadRequest(f"unknown status {status[:40]!r}: use all or one of "
                             + ", ".join(STATUSES))
        limit = int(number(args, "limit", 100, lo=1, hi=config.max_list) or 100)
        return listing(scheduler.records(status, limit + 1, args.get("before")), limit,
                       {k: v for k, v in (("status", status), ("limit", args.get("limit")))
                        if v is not None})

    def listing(records: Any, limit: int, query: dict[str, str]) -> Response:
        """At most ``limit`` records and ``max_list_bytes`` of JSON (one record at least);
        a ``Link: rel="next"`` header when there are more."""
        parts: list[str] = []
        size, last, more = 2, None, False
        for record in records:
            text = json.dumps(record.public())
            if len(parts) == limit or (parts and size + len(text) > config.max_list_bytes):
                more = True
                break
            parts.append(text)
            size += len(text) + 1
            last = record.id
        headers = {}
        if more and last is not None:
            next_query = urllib.parse.urlencode({**query, "before": last})
            headers["Link"] = f'</fn?{next_query}>; rel="next"'
        return Response(f"[{','.join(parts)}]", content_type=JSON_TYPE, headers=headers)

    @app.post("/fn")
    async def create_function() -> Response:
        return await submit(None)

    @app.get("/fn/<fid>")
    async def show_function(fid: str) -> Response:
        spec = choice(request.args, "spec", ("", "summary", "full"))
        wait = wait_arg()
        record: Record = await scheduler.wait(fid, wait) if wait else scheduler.get(fid)
        shown = record.public()
        if spec != "full":
            return reply(shown)
        # The spec as kept is JSON already, and may be megabytes: spliced in, not decoded.
        del shown["spec"]
        head = json.dumps(shown)[:-1].encode()
        return Response(head + b', "spec": ' + scheduler.full_spec(fid) + b"}",
                        content_type=JSON_TYPE)

    def kept_files(fid: str) -> list[dict[str, Any]]:
        record = scheduler.get(fid)
        if not record.spec.get("outputs"):
            raise NotFound(f"function {fid} asked for no output files")
        if not record.finished:
            raise Conflict(f"function {fid} is {record.status}: its output files are "
                           "collected when it ends")
        return record.files or []  # none when it never ran

    @app.get("/fn/<fid>/files")
    async def function_files(fid: str) -> Response:
        length, stream = await scheduler.files_store.tar(fid, kept_files(fid))
        return Response(stream, content_type="application/x-tar", headers={
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{fid}.tar"'})

    @app.get("/fn/<fid>/files/<path:path>")
    async def function_file(fid: str, path: str) -> Response:
        files = kept_files(fid)
        index = next((i for i, f in enumerate(files) if f["path"] == path), None)
        if index is None:
            raise NotFound(f"function {fid} has no output file {path[:200]!r}")
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        stored = scheduler.files_store.path(fid, index)
        # Whatever a function wrote is shown as its own sandboxed origin: an HTML file can
        # never reach this server's pages or their token.
        return Response(scheduler.files_store.read(stored, files[index]["size"]),
                        content_type=kind, headers={
                            "Content-Length": str(files[index]["size"]),
                            "Content-Security-Policy": "sandbox",
                            "X-Content-Type-Options": "nosniff"})

    @app.post("/fn/<fid>")
    async def follow_function(fid: str) -> Response:
        return await submit(fid)

    @app.put("/fn/<fid>")
    async def update_function(fid: str) -> Response:
        return reply((await scheduler.update(fid, await body())).public())

    @app.delete("/fn/<fid>")
    async def cancel_function(fid: str) -> Response:
        container = choice(request.args, "container", ("", "keep", "remove"))
        record = await scheduler.cancel(fid, remove_container=container == "remove",
                                        purge=flag(request.args, "purge"))
        return reply(record.public())

    @app.get("/pools")
    async def pools() -> Response:
        shown = []
        for p in scheduler.pools:
            s = p.statistics()
            shown.append({
                "name": s.name, "image": p.reference, "image_id": p.image, "mode": s.mode,
                "profile": profile_view(p.profile), "warm": s.idle, "busy": s.busy,
                "starting": s.starting, "total": s.total, "queued": s.waiting,
                "min_idle": p.min_idle, "max": p.max, "last_error": s.last_error,
                "zygote": s.zygote,
            })
        return reply(shown)

    @app.get("/healthz")
    async def healthz() -> Response:
        if await healthy():
            return reply({"status": "ok"})
        return error(503, "the Docker engine does not answer")

    @app.get("/watchers")
    async def watchers() -> Response:
        return reply([vars(s) for s in scheduler.hub.statistics()])

    @app.websocket("/fn/ws")
    async def fn_socket() -> None:
        await websocket.accept()
        await serve_socket(scheduler, websocket.receive, websocket.send)

    app.register_blueprint(piston_api(scheduler, config))
    return app
