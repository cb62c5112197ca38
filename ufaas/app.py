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
from typing import Any

from quart import Response, g, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .service import Conflict, NotFound, QueueFull, Service
from .store import STATUSES
from .tasks import SpecError
from .ws import serve_socket

log = logging.getLogger("ufaas")


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


def _number(name: str, default: float | None, *, lo: float, hi: float) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be a number, not {raw[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"query parameter {name!r} must be between {lo:g} and {hi:g}")
    return value


def _flag(name: str) -> bool:
    raw = request.args.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise BadRequest(f"query parameter {name!r} must be true or false")


async def _json_body() -> Any:
    data = await request.get_data(cache=False)
    g.body_read = True
    if not data:
        raise BadRequest("request body is empty: send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def create_app(service: Service) -> QuartTrio:
    config = service.config
    app = QuartTrio("ufaas")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    token = (config.token or "").encode()

    def authorized(headers: Any, args: Any) -> bool:
        if not token:
            return True
        given = ""
        auth = headers.get("Authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110)
            given = credentials.strip()
        else:
            given = args.get("token", "")
        return hmac.compare_digest(given.encode(errors="replace"), token)

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
        return _number("wait", None, lo=0, hi=config.max_wait)

    async def created(record_id: str, wait: float | None) -> Response:
        record = service.get(record_id)
        headers = {"Location": f"/fn/{record_id}"}
        if wait:
            record = await service.wait(record_id, wait)
            if record.finished:
                return reply(record.public(), 200, headers)
        return reply(record.public(), 202, headers)

    @app.get("/fn")
    async def list_functions() -> Response:
        status = request.args.get("status")
        if status is not None and status != "all" and status not in STATUSES:
            raise BadRequest(f"unknown status {status[:40]!r}: use all or one of "
                             + ", ".join(STATUSES))
        limit = int(_number("limit", 100, lo=1, hi=10000) or 100)
        return reply([r.public() for r in service.list(status, limit)])

    @app.post("/fn")
    async def create_function() -> Response:
        wait = wait_arg()  # a bad query refuses the request before anything is queued
        body = await _json_body()
        return await created(service.create(body).id, wait)

    @app.get("/fn/<fid>")
    async def show_function(fid: str) -> Response:
        wait = wait_arg()
        record = await service.wait(fid, wait) if wait else service.get(fid)
        return reply(record.public())

    @app.post("/fn/<fid>")
    async def follow_function(fid: str) -> Response:
        strict, wait = _flag("strict"), wait_arg()
        body = await _json_body()
        return await created(service.create(body, after=fid, strict=strict).id, wait)

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
                                      purge=_flag("purge"))
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
