"""The HTTP API, every route on Quart-Trio: requests become :class:`~ufaas.scheduler.Scheduler`
calls and answers are shaped here; the WebSocket route hands its socket to :mod:`ufaas.ws`.
Each route is documented by the models of :mod:`ufaas.openapi`, which also parse its query.

Every error is JSON ``{"error": message, "detail": ...}`` with a 4xx status naming the
problem; nothing a caller sends may produce a 500. Every route needs the token, when one
is set, but those of ``PUBLIC``: the dashboard's and the document browser's static files,
which hold nothing of the server's (every data route they call needs the token).
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import trio
from quart import Response, request, websocket
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_schema import hide
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from .config import Config
from .files import Gone
from .live import WatcherStatistics
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics
from .openapi import (
    BadQuery,
    CancelQuery,
    ErrorBody,
    FollowQuery,
    Health,
    ListQuery,
    NodeView,
    PoolView,
    RecordView,
    ShowQuery,
    SubmitQuery,
    bounded,
    documented,
    install,
)
from .piston import PISTON_PREFIX, piston_api
from .scheduler import Conflict, NotFound, QueueFull, Scheduler
from .spec import BadJSON, Spec, SpecError
from .store import Record
from .ws import serve_socket

log = logging.getLogger("ufaas")

JSON_TYPE = "application/json"
# Routes anyone may call: static files of the browser pages (see the module's docstring).
PUBLIC = frozenset({"dashboard", "docs", "asset"})
UI_FILES = {".html", ".js", ".css", ".svg"}


def error(status: int, message: str, detail: Any = None,
          headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": message, "detail": detail})
    return Response(body, status=status, content_type=JSON_TYPE, headers=headers)


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


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
    data = getattr(request, "whole_body", None)  # see _Connection
    if data is None:
        data = await request.get_data(cache=False, as_text=False)
    request.body_read = True  # type: ignore[attr-defined]  # see _Connection
    assert isinstance(data, bytes)
    return data


class _Connection(TrioASGIHTTPConnection):
    """Quart-Trio's handling of one HTTP request, answered whole and with less around it:

    - the request is handled in the task hypercorn gave it, which first takes its body
      (within ``body_timeout`` and ``max_body``; not when its token is wrong), then runs
      the view: no task watches the connection, so a client that leaves meanwhile is
      noticed when the view returns (the longest a view waits is ``max_wait``); that
      saves a task and its cancellation on every request. A body that does not come
      within those is left to Quart-Trio's own way, a task feeding it that also cancels
      the request when the client leaves, and Quart answers 408 or 413;
    - once started, the answer is sent shielded (within ``send_timeout``): hypercorn closes
      a ``Connection: close`` connection from inside that send, and a watcher, seeing the
      disconnect this causes, would cancel it half-way, leaving it open;
    - a body held in memory goes with the end of the response (two ASGI messages, not
      three);
    - a request whose body no view read (refused before reading it, or sent where none
      belongs) gets its connection closed: its unread rest would stall the client's next
      request on it.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        app = self.app
        assert isinstance(app, _App)
        # Not when its token is wrong: the route answers 401 without reading it.
        taken = await self._take_body(request, receive) if app.has_token(request) else "left"
        if taken == "gone":
            return
        if taken == "whole":
            return await self._answer(request, send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            await self._answer(request, send)
            nursery.cancel_scope.cancel()

    async def _take_body(self, request: Any, receive: Any) -> str:
        """Read the body before the view runs: "whole" when it came within body_timeout and
        max_body, "gone" when the client left first, else "left" (to Quart-Trio's way,
        which answers 408 or 413 when the view reads it)."""
        size, limit = 0, self.app.config["MAX_CONTENT_LENGTH"]
        if (request.content_length or 0) > limit:
            return "left"  # Quart's body refuses it (413) without reading it
        single: bytes | None = None  # the body while it came in one piece
        with trio.move_on_after(self.app.config["BODY_TIMEOUT"]) as reading:
            while size <= limit:  # past it, Quart's body refuses it
                message = await receive()
                if message["type"] != "http.request":
                    return "gone"
                data = message.get("body", b"")
                if data and size == 0:
                    single = data
                elif data:  # in pieces: gathered as Quart does (one growing buffer)
                    if single is not None:
                        request.body.append(single)
                        single = None
                    request.body.append(data)
                size += len(data)
                if size <= limit and not message.get("more_body", False):
                    request.body.set_complete()
                    # In one piece (or none), the views take it as it is (see body()).
                    request.whole_body = single if size else b""
                    return "whole"
        if single is not None:
            request.body.append(single)
        if reading.cancelled_caught:
            request.body_timeout = 0  # Quart's body answers 408 to the view that awaits it
        return "left"

    async def _answer(self, request: Any, send: Any) -> None:
        response = await self.app.handle_request(request)
        if not getattr(request, "body_read", False) and (
                request.content_length or "Transfer-Encoding" in request.headers):
            response.headers["Connection"] = "close"
        with trio.CancelScope(shield=True) as answering:
            answering.deadline = trio.current_time() + self.app.config["SEND_TIMEOUT"]
            await self._send_response(send, response)

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
    token = b""

    def has_token(self, request: Any) -> bool:
        """Whether ``request`` (or a WebSocket's handshake) carries the token (always,
        when none is set); a Piston route's may carry it bare."""
        return not self.token or authorized(
            self.token, request.headers.get("Authorization", ""), request.args,
            bare=request.path.startswith(PISTON_PREFIX))


def _assets() -> dict[str, tuple[bytes, str]]:
    """The browser pages' files (package data in ufaas/ui), read once: name -> (content,
    type)."""
    found = {}
    for entry in (resources.files("ufaas") / "ui").iterdir():
        kind = mimetypes.guess_type(entry.name)[0]
        if entry.is_file() and kind is not None and Path(entry.name).suffix in UI_FILES:
            found[entry.name] = (entry.read_bytes(), f"{kind}; charset=utf-8")
    return found


ERROR = ErrorBody
BAD_QUERY = (ERROR, "a query parameter is refused")
UNKNOWN = (ERROR, "no function has that id")
BAD_BODY = {400: (ERROR, "the body is not JSON, or a query parameter is refused"),
            413: (ERROR, "the body is over max_body"),
            422: (ERROR, "the spec fails validation: the message names the field; detail "
                  "lists the problems")}
LOCATION = {"Location": "the record's path, /fn/{id}"}
FILES_ERRORS: dict[int, tuple[Any, str]] = {
    404: (ERROR, "no function has that id, it asked for no output files, or has none of "
          "that path"),
    409: (ERROR, "it has not finished: its files are collected when it ends"),
    410: (ERROR, "its files were removed, past files_retention")}


def create_app(scheduler: Scheduler, config: Config,
               healthy: Callable[[], Awaitable[bool]], metrics: Metrics,
               nodes: Callable[[], list[dict[str, Any]]]) -> QuartTrio:
    app = _App("ufaas", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = config.body_timeout
    app.config["SEND_TIMEOUT"] = config.send_timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    token = app.token = (config.token or "").encode()
    install(app, token=bool(token))
    assets = _assets()
    wait = (0.0, config.max_wait)
    submit_query = bounded(SubmitQuery, wait=wait)
    follow_query = bounded(FollowQuery, wait=wait)
    show_query = bounded(ShowQuery, wait=wait)
    list_query = bounded(ListQuery, limit=(1, config.max_list))

    async def check_token() -> Response | None:
        if request.endpoint in PUBLIC:
            return None
        if not app.has_token(request):
            if request.path.startswith(PISTON_PREFIX):  # errors as Piston shapes them
                return Response(json.dumps({"message": "missing or wrong token"}), 401,
                                content_type=JSON_TYPE)
            return error(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})
        return None

    if token:  # without one there is nothing to check
        app.before_request(check_token)

    @app.before_websocket
    async def check_ws_token() -> Response | None:
        if not app.has_token(websocket):
            return error(401, "missing or wrong token")
        return None

    @app.errorhandler(BadQuery)
    async def bad_query(exc: BadQuery) -> Response:
        return error(400, str(exc))

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
        allow = dict(exc.get_headers()).get("Allow")
        return error(exc.code or 500, exc.description or exc.name,
                     headers={"Allow": allow} if allow else None)

    @app.errorhandler(Exception)
    async def internal(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error", type(exc).__name__)

    async def submit(after: str | None, wait: float | None, strict: bool) -> Response:
        raw = await body()
        function = await scheduler.submit(raw, after=after, strict=strict, waited=bool(wait))
        headers = {"Location": f"/fn/{function.id}"}
        record = function.record
        if wait:
            record = await scheduler.wait(function.id, wait)
            if record.finished:
                return reply(record.public(), 200, headers)
            function.persist()
        return reply(record.public(), 202, headers)

    @app.get("/fn")
    @documented(query=list_query, answers={
        200: (list[RecordView], "records, newest first"), 400: BAD_QUERY,
        404: (ERROR, "no function has the id of ?before")},
        headers={200: {"Link": 'where more records are: </fn?...&before=ID>; rel="next"'}})
    async def list_functions() -> Response:
        """Function records: the active ones, or those of one status."""
        query = list_query.parse(request.args)
        given = {k: v for k, v in (("status", query.status),
                                   ("limit", request.args.get("limit"))) if v is not None}
        return listing(scheduler.records(query.status, query.limit + 1, query.before),
                       query.limit, given)

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
    @documented(query=submit_query, body=Spec, answers={
        200: (RecordView, "finished within ?wait"),
        202: (RecordView, "accepted: pending or running"), **BAD_BODY,
        429: (ERROR, "too many functions are pending")},
        headers={200: LOCATION, 202: LOCATION, 429: {"Retry-After": "seconds"}})
    async def create_function() -> Response:
        """Create and queue a function."""
        query = submit_query.parse(request.args)  # refused before anything is queued
        return await submit(None, query.wait, False)

    @app.get("/fn/<fid>")
    @documented(query=show_query, answers={
        200: (RecordView, "the record, with its output so far"), 400: BAD_QUERY,
        404: UNKNOWN})
    async def show_function(fid: str) -> Response:
        """One record."""
        query = show_query.parse(request.args)
        record: Record = (await scheduler.wait(fid, query.wait) if query.wait
                          else scheduler.get(fid))
        shown = record.public()
        if query.spec != "full":
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
    @documented(answers=FILES_ERRORS, text=("application/x-tar", "every output file kept"),
                headers={200: {"Content-Length": "bytes",
                               "Content-Disposition": "attachment; filename=ID.tar"}})
    async def function_files(fid: str) -> Response:
        """A finished function's output files, as one tar archive."""
        archive = await scheduler.files_store.tar(fid, kept_files(fid))
        return Response(archive, content_type="application/x-tar", headers={
            "Content-Length": str(archive.length),
            "Content-Disposition": f'attachment; filename="{fid}.tar"'})

    @app.get("/fn/<fid>/files/<path:path>")
    @documented(answers=FILES_ERRORS, text=("*/*", "the file, of the type its name says "
                                            "(application/octet-stream when it says none)"),
                headers={200: {"Content-Length": "bytes",
                               "Content-Security-Policy": "sandbox: a page it holds runs "
                               "in an origin of its own"}})
    async def function_file(fid: str, path: str) -> Response:
        """One output file of a finished function."""
        files = kept_files(fid)
        index = next((i for i, f in enumerate(files) if f["path"] == path), None)
        if index is None:
            raise NotFound(f"function {fid} has no output file {path[:200]!r}")
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        body = await scheduler.files_store.file(fid, index, files[index]["size"])  # or Gone
        # Whatever a function wrote is shown as its own sandboxed origin: an HTML file can
        # never reach this server's pages or their token.
        return Response(body, content_type=kind, headers={
            "Content-Length": str(body.length),
            "Content-Security-Policy": "sandbox",
            "X-Content-Type-Options": "nosniff"})

    @app.post("/fn/<fid>")
    @documented(query=follow_query, body=Spec, answers={
        200: (RecordView, "finished within ?wait"),
        202: (RecordView, "accepted: pending or running"), **BAD_BODY, 404: UNKNOWN,
        409: (ERROR, "strict, and the predecessor's container is gone or of another "
              "pool"), 429: (ERROR, "too many functions are pending")},
        headers={200: LOCATION, 202: LOCATION, 429: {"Retry-After": "seconds"}})
    async def follow_function(fid: str) -> Response:
        """A follow-up: run in the container and working directory of function fid (the
        image may be left out)."""
        query = follow_query.parse(request.args)
        return await submit(fid, query.wait, query.strict)

    @app.put("/fn/<fid>")
    @documented(body=Spec, partial=True, answers={
        200: (RecordView, "the pending function, changed"), **BAD_BODY, 404: UNKNOWN,
        409: (ERROR, "it has started: only pending functions change")})
    async def update_function(fid: str) -> Response:
        """Change a pending function's spec."""
        return reply((await scheduler.update(fid, await body())).public())

    @app.delete("/fn/<fid>")
    @documented(query=CancelQuery, answers={
        200: (RecordView, "the record once cancelled (a finished one stays as it was)"),
        400: BAD_QUERY, 404: UNKNOWN})
    async def cancel_function(fid: str) -> Response:
        """Cancel: a pending function never starts, a running one is killed."""
        query = CancelQuery.parse(request.args)
        record = await scheduler.cancel(fid, remove_container=query.container == "remove",
                                        purge=query.purge)
        return reply(record.public())

    @app.get("/pools")
    @documented(answers={200: (list[PoolView], "each pool")})
    async def pools() -> Response:
        """The pools: warm, busy and starting containers, queued functions, zygotes."""
        shown = []
        for p in scheduler.pools:
            s = p.statistics()
            shown.append(PoolView.model_validate(dict(
                name=s.name, node=p.node, image=p.reference, image_id=p.image, mode=s.mode,
                profile=p.profile, warm=s.idle, busy=s.busy, starting=s.starting,
                total=s.total, queued=s.waiting, min_idle=p.min_idle, max=p.max,
                last_error=s.last_error, zygote=s.zygote,
            )).model_dump(mode="json"))
        return reply(shown)

    @app.get("/nodes")
    @documented(answers={200: (list[NodeView], "each node")})
    async def list_nodes() -> Response:
        """The nodes the pools run on (without a cluster, this machine's engine alone):
        their state, capacity and last contact."""
        return reply(nodes())

    @app.get("/healthz")
    @documented(answers={200: (Health, "the Docker engine answers (in a cluster: a node is "
                               "ready)"),
                         503: (ERROR, "the Docker engine does not answer (in a cluster: no "
                               "node is ready)")})
    async def healthz() -> Response:
        """Whether the Docker engine answers; in a cluster, whether a node is ready."""
        if await healthy():
            return reply({"status": "ok"})
        return error(503, "the Docker engine does not answer" if not config.cluster.enabled
                     else "no node is ready")

    @app.get("/watchers")
    @documented(answers={200: (list[WatcherStatistics], "each WebSocket client's buffer")})
    async def watchers() -> Response:
        """The WebSocket clients: what each follows and buffers."""
        return reply([vars(s) for s in scheduler.hub.statistics()])

    @app.get("/metrics")
    @documented(answers={}, text=(METRICS_TYPE, "the metrics"))
    async def metrics_text() -> Response:
        """Metrics in the Prometheus text format."""
        return Response(metrics.exposition(), content_type=METRICS_TYPE)

    def send(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            return error(404, f"no file {name[:80]!r}")
        return Response(found[0], content_type=found[1], headers={"Cache-Control": "no-cache"})

    @app.get("/")
    @hide
    async def dashboard() -> Response:
        return send("index.html")

    @app.get("/docs")
    @hide
    async def docs() -> Response:
        return send("docs.html")

    @app.get("/ui/<name>")
    @hide
    async def asset(name: str) -> Response:
        return send(name)

    @app.websocket("/fn/ws")
    async def fn_socket() -> None:
        await websocket.accept()
        await serve_socket(scheduler, websocket.receive, websocket.send)

    app.register_blueprint(piston_api(scheduler, config, body))
    return app
