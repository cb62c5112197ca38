"""A Python client for a running ufaas server: its REST calls and live WebSocket streams.

:class:`Client` is for trio (every call is a coroutine); :class:`SyncClient` makes the same
calls blocking. REST goes over httpx (async under trio, or sync), WebSocket over
trio-websocket. Either client can be used as a context manager, which closes its
connections at the end.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE = 16 << 20
# The longest a closing WebSocket waits for the server's close frame.
DISCONNECT_TIMEOUT = 5.0

Event = dict[str, Any]
Output = Callable[[str], Awaitable[None] | None]


class ClientError(Exception):
    """The server refused a call (``status`` is its HTTP status) or could not be reached
    (``status`` 0)."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.detail = status, message, detail


class _Calls:
    """The REST calls, each made through ``_call`` (a coroutine or a blocking call)."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """``url`` and ``token`` default to ``UFAAS_URL`` and ``UFAAS_TOKEN``."""
        self.url = (url or os.environ.get("UFAAS_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else (os.environ.get("UFAAS_TOKEN") or None)
        self.timeout = timeout
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http or https URL: {self.url!r}")
        self._parts = parts

    def _call(self, method: str, path: str, body: Any = None, hold: float | None = None,
              **params: Any) -> Any:
        """Make the request; ``hold`` is how long the server may hold the answer."""
        raise NotImplementedError

    def create(self, spec: dict[str, Any], *, after: str | None = None, strict: bool = False,
               wait: float | None = None) -> Any:
        """Queue a function (in the container of ``after`` if given): its record."""
        path = "/fn" if after is None else f"/fn/{quote(after, safe='')}"
        return self._call("POST", path, spec, wait, wait=wait, strict=strict or None)

    def get(self, fid: str, *, wait: float | None = None, full_spec: bool = False) -> Any:
        """A function's record, once finished if it ends within ``wait`` seconds;
        ``full_spec``: with its spec as sent, content included."""
        return self._call("GET", f"/fn/{quote(fid, safe='')}", None, wait, wait=wait,
                          spec="full" if full_spec else None)

    def list(self, status: str | None = None, limit: int | None = None,
             before: str | None = None) -> Any:
        """Records, newest first: the active ones, or ``status`` (``all`` or one status);
        ``before``: only those older than that id (the next page)."""
        return self._call("GET", "/fn", status=status, limit=limit, before=before)

    def update(self, fid: str, changes: dict[str, Any]) -> Any:
        return self._call("PUT", f"/fn/{quote(fid, safe='')}", changes)

    def cancel(self, fid: str, *, remove_container: bool = False, purge: bool = False) -> Any:
        return self._call("DELETE", f"/fn/{quote(fid, safe='')}",
                          container="remove" if remove_container else None,
                          purge="true" if purge else None)

    def pools(self) -> Any:
        return self._call("GET", "/pools")

    def health(self) -> Any:
        return self._call("GET", "/healthz")

    # -- plumbing -------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {"base_url": self.url, "headers": {"Accept": "application/json", **self._auth()},
                "timeout": self.timeout}

    def _request(self, path: str, body: Any, hold: float | None,
                 params: dict[str, Any]) -> dict[str, Any]:
        """The keywords of one ``httpx`` request."""
        request: dict[str, Any] = {
            "url": path, "params": {k: v for k, v in params.items() if v is not None},
            "timeout": self.timeout + (hold or 0)}
        if body is not None:
            request["json"] = body
        return request

    def _answer(self, response: httpx.Response) -> Any:
        """The decoded JSON answer, or ClientError."""
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = {"error": response.text[:200]}
        if response.status_code >= 400:
            answer = answer if isinstance(answer, dict) else {}
            raise ClientError(response.status_code,
                              str(answer.get("error") or response.reason_phrase),
                              answer.get("detail"))
        return answer

    def _unreachable(self, exc: Exception) -> ClientError:
        return ClientError(0, f"cannot reach {self.url}: {exc}")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self._parts.scheme == "https" else "ws"
        return f"{scheme}://{self._parts.netloc}{self._parts.path.rstrip('/')}/fn/ws"


class Stream:
    """One WebSocket connection to ``/fn/ws``: run, watch, feed and cancel functions, and
    iterate over the events of what it runs and watches (see the README)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._early: deque[Event] = deque()

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(json.dumps(message))

    async def receive(self) -> Event:
        """The next event; ConnectionClosed once the server has gone."""
        if self._early:
            return self._early.popleft()
        return json.loads(await self.ws.get_message())

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.receive()
            except ConnectionClosed:
                return

    async def run(self, spec: dict[str, Any], *, after: str | None = None,
                  strict: bool = False) -> str:
        """Create a function and follow it: its id. Its stdin stays open until
        :meth:`feed` sends ``eof`` or this connection closes."""
        await self.send(op="run", spec=spec, after=after, strict=strict)
        while True:
            event = await self.receive()
            if event["event"] == "created":
                return str(event["id"])
            if event["event"] == "error" and "id" not in event:
                raise ClientError(422 if "detail" in event else 400, event["message"],
                                  event.get("detail"))
            self._early.append(event)  # another function's: kept for receive()

    async def watch(self, fid: str) -> None:
        """Follow ``fid`` (``*``: the status of every function): replay, then live events."""
        await self.send(op="watch", id=fid)

    async def feed(self, fid: str, data: str = "", *, eof: bool = False) -> None:
        await self.send(op="stdin", id=fid, data=data, eof=eof)

    async def cancel(self, fid: str) -> None:
        await self.send(op="cancel", id=fid)


class Client(_Calls):
    """The trio client: every REST call is a coroutine; :meth:`stream` and :meth:`run`
    use the WebSocket API. A call cancelled while it waits closes its connection."""

    _http: httpx.AsyncClient | None = None

    async def _call(self, method: str, path: str, body: Any = None, hold: float | None = None,
                    **params: Any) -> Any:
        if self._http is None:
            self._http = httpx.AsyncClient(**self._options())
        try:
            response = await self._http.request(method, **self._request(path, body, hold,
                                                                         params))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(response)

    async def save_files(self, fid: str, directory: str | os.PathLike[str] = ".",
                         files: list[dict[str, Any]] | None = None) -> list[str]:
        """Write the output files of finished function ``fid`` below ``directory`` (at
        their paths; ``files``: only those, as an exit event lists them): their paths."""
        if files is None:
            files = (await self.get(fid)).get("files") or []
        written = []
        for url, target in _downloads(fid, files, directory):
            if self._http is None:
                self._http = httpx.AsyncClient(**self._options())
            try:
                async with self._http.stream("GET", url) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        self._answer(response)
                    await trio.to_thread.run_sync(partial(os.makedirs, os.path.dirname(target),
                                                          exist_ok=True))
                    async with await trio.open_file(target, "wb") as out:
                        async for chunk in response.aiter_bytes():
                            await out.write(chunk)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            written.append(target)
        return written

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[Stream]:
        """A WebSocket connection, closed when the block ends."""
        headers = [(k.lower().encode(), v.encode()) for k, v in self._auth().items()]
        try:
            async with open_websocket_url(
                    self.ws_url, extra_headers=headers, max_message_size=MAX_MESSAGE,
                    receive_buffer_size=None, connect_timeout=self.timeout,
                    disconnect_timeout=min(self.timeout, DISCONNECT_TIMEOUT)) as ws:
                yield Stream(ws)
        except ConnectionRejected as exc:
            raise ClientError(exc.status_code, _rejection(exc.body)) from None
        except (HandshakeError, OSError) as exc:
            raise ClientError(0, f"cannot reach {self.ws_url}: {exc}") from exc

    async def run(self, spec: dict[str, Any], *, after: str | None = None,
                  stdout: Output | None = None, stderr: Output | None = None,
                  stdin: AsyncIterable[str] | str | None = None,
                  created: Callable[[str], Any] | None = None) -> Event:
        """Run a function, handing its output to ``stdout``/``stderr`` (plain or async
        callables) as it comes; its exit event (``status``, ``exit_code``, ``signal``,
        ``error``).

        ``stdin`` (text, or an async iterable of text) is fed live, then end-of-file;
        ``created(id)`` is called once the server has the function. If this client reads
        too slowly and misses output, it watches again and skips what it already had.
        """
        async with self.stream() as stream:
            fid = await stream.run(spec, after=after)
            if created is not None:
                created(fid)
            failure: ClientError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed, stream, fid, stdin)
                try:
                    exit_event = await _follow(stream, fid, {"stdout": stdout,
                                                             "stderr": stderr})
                except ClientError as exc:  # raised outside the nursery, ungrouped
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        return exit_event


async def _feed(stream: Stream, fid: str, stdin: AsyncIterable[str] | str | None) -> None:
    try:
        if isinstance(stdin, str):
            await stream.feed(fid, stdin)
        elif stdin is not None:
            async for text in stdin:
                if text:
                    await stream.feed(fid, text)
        await stream.feed(fid, eof=True)
    except ConnectionClosed:
        pass


async def _follow(stream: Stream, fid: str, outputs: dict[str, Output | None]) -> Event:
    had = {"stdout": 0, "stderr": 0}  # characters already handed over, per stream
    skip = {"stdout": 0, "stderr": 0}
    async for event in stream:
        if event.get("id") != fid:
            continue
        kind = event["event"]
        if kind in outputs:
            data = event["data"]
            if skip[kind]:
                cut = min(skip[kind], len(data))
                data, skip[kind] = data[cut:], skip[kind] - cut
            if data:
                had[kind] += len(data)
                out = outputs[kind]
                result = out(data) if out is not None else None
                if inspect.isawaitable(result):
                    await result
        elif kind == "exit":
            return event
        elif kind == "error" and event.get("missed"):
            skip = dict(had)  # the replay starts from the beginning
            await stream.watch(fid)
        elif kind == "error":
            raise ClientError(400, event["message"])
    raise ClientError(0, "the server closed the connection before the function ended")


def _downloads(fid: str, files: list[dict[str, Any]],
               directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """For each output file listed (a record's or an exit event's ``files``): its URL
    path and where it goes below ``directory``, which no listed path may leave."""
    root = os.path.realpath(directory)
    planned = []
    for f in files:
        path = str(f["path"])
        target = os.path.realpath(os.path.join(root, path))
        if os.path.isabs(path) or ".." in path.split("/") or \
                os.path.commonpath([root, target]) != root:
            raise ClientError(0, f"output file {path!r} would land outside {root}")
        planned.append((f"/fn/{quote(fid, safe='')}/files/{quote(path)}", target))
    return planned


def _rejection(body: bytes | None) -> str:
    try:
        return str(json.loads(body or b"")["error"])
    except (ValueError, KeyError, TypeError):
        return (body or b"connection refused").decode(errors="replace")[:200]


class SyncClient(_Calls):
    """The blocking client: the same REST calls as :class:`Client`, and :meth:`run`."""

    _http: httpx.Client | None = None

    def _call(self, method: str, path: str, body: Any = None, hold: float | None = None,
              **params: Any) -> Any:
        if self._http is None:
            self._http = httpx.Client(**self._options())
        try:
            response = self._http.request(method, **self._request(path, body, hold, params))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(response)

    def save_files(self, fid: str, directory: str | os.PathLike[str] = ".",
                   files: list[dict[str, Any]] | None = None) -> list[str]:
        """As :meth:`Client.save_files`, blocking."""
        if files is None:
            files = self.get(fid).get("files") or []
        written = []
        for url, target in _downloads(fid, files, directory):
            if self._http is None:
                self._http = httpx.Client(**self._options())
            try:
                with self._http.stream("GET", url) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._answer(response)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            written.append(target)
        return written

    def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            http.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, spec: dict[str, Any], *, after: str | None = None,
            stdout: Callable[[str], None] | None = None,
            stderr: Callable[[str], None] | None = None, stdin: str | None = None) -> Event:
        """As :meth:`Client.run`, blocking (runs its own trio loop)."""
        client = Client(self.url, self.token, timeout=self.timeout)
        return trio.run(partial(client.run, spec, after=after, stdout=stdout, stderr=stderr,
                                stdin=stdin))


__all__ = ["Client", "ClientError", "Stream", "SyncClient"]
