"""The HTTP API: translates requests into :class:`~ufaas.service.Service` calls; the
WebSocket route hands its socket to :mod:`ufaas.ws`.

Every error is JSON ``{"error": message, "detail": ...}`` with a 4xx status naming the
problem; nothing a caller sends may produce a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any

import trio
from quart import Response, g, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .service import Conflict, NotFound, QueueFull, Service
from .store import STATUSES
from .tasks import SpecError
from .ws import serve_socket

log = logging.getLogger("ufaas")


# How long a client may take to send a request body (Quart's BODY_TIMEOUT, set below).
BODY_TIMEOUT = 60.0


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, detail: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.detail = message, status, detail


def error(status: int, message: str, detail: Any = None,
          headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message, "detail": detail})
    return Response(body, status=status, content_type="application/json", headers=headers)


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json",
                    headers=headers)


def _number(args: Mapping[str, str], name: str, default: float | None, *, lo: float,
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


def _flag(args: Mapping[str, str], name: str) -> bool:
    raw = args.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise BadRequest(f"query parameter {name!r} must be true or false")


async def _body() -> bytes:
    data = await request.get_data(cache=False)
    g.body_read = True
    return data


async def _json_body() -> Any:
    return _decode(await _body())


def _decode(data: bytes) -> Any:
    if not data:
        raise BadRequest("request body is empty: send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def _authorized(token: bytes, authorization: str, args: Mapping[str, str]) -> bool:
    if not token:
        return True
    given = ""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110)
        given = credentials.strip()
    else:
        given = args.get("token", "")
    return hmac.compare_digest(given.encode(errors="replace"), token)


async def _submit(service: Service, body: bytes, args: Mapping[str, str],
                  after: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``POST /fn`` and ``POST /fn/{id}``: status, record and headers of the answer."""
    strict = _flag(args, "strict") if after is not None else False
    # A bad query refuses the request before anything is queued.
    wait = _number(args, "wait", None, lo=0, hi=service.config.max_wait)
    record = service.create(_decode(body), after=after, strict=strict)
    headers = {"Location": f"/fn/{record.id}"}
    if wait:
        record = await service.wait(record.id, wait)
        if record.finished:
            return 200, record.public(), headers
    return 202, record.public(), headers


def create_app(service: Service) -> QuartTrio:
    config = service.config
    app = QuartTrio("ufaas")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    token = (config.token or "").encode()

    def authorized(headers: Any, args: Any) -> bool:
        return _authorized(token, headers.get("Authorization", ""), args)

    @app.before_request
    async def check_token() -> Response | None:
        if not authorized(request.headers, request.args):
            return error(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    async def close_if_body_unread(response: Response) -> Response:
        # A body we never read (refused before reading it, or sent where none belongs)
        # would stall the client's next request on this connection: close it instead.
        has_body = request.content_length or "Transfer-Encoding" in request.headers
        if has_body and not g.get("body_read"):
            response.headers["Connection"] = "close"
        return response

    @app.before_websocket
    async def check_ws_token() -> Response | None:
        if not authorized(websocket.headers, websocket.args):
            return error(401, "missing or wrong token")
        return None

    @app.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> Response:
        return error(exc.status, exc.message, exc.detail)

    @app.errorhandler(SpecError)
    async def bad_spec(exc: SpecError) -> Response:
        return error(422, exc.message, exc.errors)

    @app.errorhandler(NotFound)
    async def not_found(exc: NotFound) -> Response:
        return error(404, str(exc))

    @app.errorhandler(Conflict)
    async def conflict(exc: Conflict) -> Response:
        return error(409, str(exc))

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
        return _number(request.args, "wait", None, lo=0, hi=config.max_wait)

    async def submit(after: str | None) -> Response:
        status, record, headers = await _submit(service, await _body(), request.args, after)
        return reply(record, status, headers)

    @app.get("/fn")
    async def list_functions() -> Response:
        status = request.args.get("status")
        if status is not None and status != "all" and status not in STATUSES:
            raise BadRequest(f"unknown status {status[:40]!r}: use all or one of "
                             + ", ".join(STATUSES))
        limit = int(_number(request.args, "limit", 100, lo=1, hi=10000) or 100)
        return reply([r.public() for r in service.list(status, limit)])

    @app.post("/fn")
    async def create_function() -> Response:
        return await submit(None)

    @app.get("/fn/<fid>")
    async def show_function(fid: str) -> Response:
        wait = wait_arg()
        record = await service.wait(fid, wait) if wait else service.get(fid)
        return reply(record.public())

    @app.post("/fn/<fid>")
    async def follow_function(fid: str) -> Response:
        return await submit(fid)

    @app.put("/fn/<fid>")
    async def update_function(fid: str) -> Response:
        body = await _json_body()
        return reply(service.update(fid, body).public())

    @app.delete("/fn/<fid>")
    async def cancel_function(fid: str) -> Response:
        container = request.args.get("container", "")
        if container not in ("", "keep", "remove"):
            raise BadRequest("query parameter 'container' must be keep or remove")
        record = await service.cancel(fid, remove_container=container == "remove",
                                      purge=_flag(request.args, "purge"))
        return reply(record.public())

    @app.get("/pools")
    async def pools() -> Response:
        return reply(service.statistics())

    @app.get("/healthz")
    async def healthz() -> Response:
        if await service.healthy():
            return reply({"status": "ok"})
        return error(503, "the Docker engine does not answer")

    @app.get("/watchers")
    async def watchers() -> Response:
        return reply(service.watchers())

    @app.websocket("/fn/ws")
    async def fn_socket() -> None:
        await websocket.accept()
        await serve_socket(service, websocket.receive, websocket.send)

    return app


class FastPath:
    """The ASGI app served: ``POST /fn`` and ``POST /fn/{id}`` straight on ASGI, the rest
    through Quart.

    Submitting a function is the hot path, and Quart's share of it (a request context,
    the hooks, a nursery of two tasks, a Response object) is about a millisecond of a
    few. A well-formed submission is answered here; anything else (a request without
    Content-Length, a wrong token, an error to report) goes to the Quart app, with the
    body replayed when it was read, so that every error is made in one place.
    """

    def __init__(self, app: QuartTrio, service: Service) -> None:
        self.app = app
        self.service = service
        self._token = (service.config.token or "").encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        after = _submit_target(scope)
        if after is False:
            return await self.app(scope, receive, send)
        config = self.service.config
        headers = dict(scope["headers"])  # names come lower-cased
        args: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(
                scope["query_string"].decode("utf-8", "replace"), keep_blank_values=True):
            args.setdefault(name, value)  # the first one counts, as in Quart's request.args
        try:
            length = int(headers.get(b"content-length", b""))
        except ValueError:
            length = -1
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if not 0 < length <= config.max_body or not _authorized(self._token, authorization,
                                                                 args):
            return await self.app(scope, receive, send)
        body = bytearray()
        with trio.move_on_after(BODY_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                body += message.get("body", b"")
                if not message.get("more_body") or len(body) > length:
                    break
        if len(body) != length:
            return await self.app(scope, _replay(bytes(body), receive), send)
        try:
            status, record, extra = await _submit(self.service, bytes(body), args,
                                                  after or None)
        except (BadRequest, SpecError, NotFound, Conflict, QueueFull):
            return await self.app(scope, _replay(bytes(body), receive), send)
        except Exception as exc:
            log.exception("unexpected error on POST %s", scope["path"])
            status, record, extra = 500, {"error": "internal error",
                                          "detail": type(exc).__name__}, {}
        data = json.dumps(record).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in extra.items()),
        ]})
        await send({"type": "http.response.body", "body": data})


def _submit_target(scope: Any) -> str | bool:
    """For a submission: "" (``POST /fn``) or the id of ``POST /fn/{id}``; else False."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path = scope["path"]
    if path == "/fn":
        return ""
    if path.startswith("/fn/") and "/" not in path[4:] and path[4:] not in ("", "ws"):
        return path[4:]
    return False


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives ``body`` first, then what ``receive`` gives."""
    sent = False

    async def replayed() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
