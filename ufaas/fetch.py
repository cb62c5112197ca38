"""Downloads of URL resources: http and https only, with a size limit and a total deadline.

Owns the download threads (stdlib ``urllib`` behind a trio capacity limiter) and an in-memory
LRU cache, so a function run again does not fetch its resources again.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from ufaas import __version__

MiB = 1 << 20
MAX_BYTES = 8 * MiB
TIMEOUT = 30.0
CACHE_BYTES = 64 * MiB
CACHE_MAX_AGE = 300.0
CONCURRENT_DOWNLOADS = 4
# Short enough that a silent server is noticed well before the deadline; a server that
# trickles bytes is caught by the deadline check after every chunk instead.
SOCKET_TIMEOUT = 5.0
CHUNK_BYTES = 64 * 1024

_SHA256 = re.compile(r"[0-9a-f]{64}")


class FetchError(Exception):
    """A URL could not be fetched; the message names the URL and the problem."""


@dataclass(frozen=True)
class DownloaderStatistics:
    downloads: int
    cache_hits: int
    cached_entries: int
    cached_bytes: int
    in_flight: int


@dataclass
class _Pending:
    done: trio.Event
    data: bytes | None = None
    error: str | None = None


@dataclass
class _Entry:
    data: bytes
    expires: float | None


class Downloader:
    """Fetches URL resources with a size limit, a deadline and a shared LRU cache.

    ``timeout`` is the total deadline of one :meth:`fetch`, counted from the call, so time
    spent waiting for one of the ``concurrency`` download slots counts too. Content fetched
    without a sha256 is cached for ``cache_max_age`` seconds; content pinned by sha256 stays
    until evicted.
    """

    def __init__(
        self,
        *,
        max_bytes: int = MAX_BYTES,
        timeout: float = TIMEOUT,
        cache_bytes: int = CACHE_BYTES,
        cache_max_age: float = CACHE_MAX_AGE,
        concurrency: int = CONCURRENT_DOWNLOADS,
    ) -> None:
        if max_bytes <= 0 or timeout <= 0 or cache_bytes < 0 or cache_max_age < 0:
            raise ValueError("max_bytes and timeout must be > 0, cache settings >= 0")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.cache_bytes = cache_bytes
        self.cache_max_age = cache_max_age
        self._limiter = trio.CapacityLimiter(concurrency)
        self._cache: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._cached_bytes = 0
        # Content hash -> the cache key holding that content, so a pinned fetch of any URL
        # can be served by content already fetched from another.
        self._by_hash: dict[str, tuple[str, str | None]] = {}
        self._pending: dict[tuple[str, str | None], _Pending] = {}
        self._downloads = 0
        self._cache_hits = 0

    def statistics(self) -> DownloaderStatistics:
        return DownloaderStatistics(
            downloads=self._downloads,
            cache_hits=self._cache_hits,
            cached_entries=len(self._cache),
            cached_bytes=self._cached_bytes,
            in_flight=len(self._pending),
        )

    async def fetch(self, url: str, sha256: str | None = None) -> bytes:
        """The content at ``url``, checked against ``sha256`` if given; raise FetchError.

        Concurrent fetches of the same URL and hash share one download. On cancellation the
        download thread is abandoned and its connection shut down, so it ends promptly.
        """
        _check_url(url)
        if sha256 is not None:
            sha256 = sha256.lower()
            if not _SHA256.fullmatch(sha256):
                raise FetchError(f"{url}: sha256 must be 64 hexadecimal digits")
        key = (url, sha256)
        while True:
            data = self._lookup(key)
            if data is not None:
                self._cache_hits += 1
                return data
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.done.wait()
            if pending.data is not None:
                self._cache_hits += 1
                return pending.data
            if pending.error is not None:
                raise FetchError(pending.error)
            # The download was cancelled: go round and start another.
        pending = self._pending[key] = _Pending(trio.Event())
        try:
            data = await self._download(url, sha256)
        except FetchError as exc:
            pending.error = str(exc)
            raise
        else:
            pending.data = data
            self._store(key, data)
            return data
        finally:
            del self._pending[key]
            pending.done.set()

    async def _download(self, url: str, sha256: str | None) -> bytes:
        self._downloads += 1
        deadline = time.monotonic() + self.timeout
        connections = _Connections()
        read = functools.partial(_read, url, self.max_bytes, self.timeout, deadline, connections)
        try:
            # A backstop: the thread keeps its own deadline, but an abandoned thread is
            # told to stop by shutting down its connection.
            with trio.fail_after(self.timeout + 1):
                data = await trio.to_thread.run_sync(
                    read, abandon_on_cancel=True, limiter=self._limiter
                )
        except trio.TooSlowError:
            connections.abort()
            raise FetchError(f"{url}: no complete response within {self.timeout:g} s") from None
        except BaseException:
            connections.abort()
            raise
        if sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise FetchError(f"{url}: sha256 is {digest}, expected {sha256}")
        return data

    def _lookup(self, key: tuple[str, str | None]) -> bytes | None:
        sha256 = key[1]
        for k in (key, self._by_hash.get(sha256) if sha256 else None):
            entry = self._cache.get(k) if k else None
            if entry is None:
                continue
            if entry.expires is not None and entry.expires < time.monotonic():
                self._evict(k)
                continue
            self._cache.move_to_end(k)
            return entry.data
        return None

    def _store(self, key: tuple[str, str | None], data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        if key in self._cache:
            self._evict(key)
        expires = None if key[1] else time.monotonic() + self.cache_max_age
        self._cache[key] = _Entry(data, expires)
        self._cached_bytes += len(data)
        self._by_hash[hashlib.sha256(data).hexdigest()] = key
        while self._cached_bytes > self.cache_bytes:
            self._evict(next(iter(self._cache)))

    def _evict(self, key: tuple[str, str | None]) -> None:
        entry = self._cache.pop(key)
        self._cached_bytes -= len(entry.data)
        digest = hashlib.sha256(entry.data).hexdigest()
        if self._by_hash.get(digest) == key:
            del self._by_hash[digest]


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched (not http/https, no host, unparsable), or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in ("http", "https"):
        return "only http and https URLs can be fetched"
    if not host:
        return "no host"
    return None


def _check_url(url: str) -> None:
    problem = url_problem(url)
    if problem is not None:
        raise FetchError(f"{url}: {problem}")


class _Connections:
    """The sockets one download opened, so the trio side can shut them down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._aborted = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._aborted:
                self._sockets.append(sock)
                return
        sock.close()
        raise FetchError("download abandoned")

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                # Wakes the thread blocked in recv, even once urllib holds the socket only
                # through the response's file object.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


class _Tracked:
    """Registers each socket it opens, so an abandoned download can be shut down."""

    def __init__(self, host: str, *, connections: _Connections, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)  # type: ignore[call-arg]
        self._connections = connections

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._connections.add(self.sock)  # type: ignore[attr-defined]


class _HTTPConnection(_Tracked, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connections: _Connections) -> None:
        super().__init__()
        self._connections = connections

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connect = functools.partial(_HTTPConnection, connections=self._connections)
        return self.do_open(connect, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connections: _Connections) -> None:
        super().__init__()
        self._connections = connections

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connect = functools.partial(_HTTPSConnection, connections=self._connections)
        return self.do_open(connect, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect to ftp://; only http and https are fetched.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            _check_url(newurl)
        except FetchError as exc:
            fp.close()
            raise FetchError(f"{req.full_url}: redirect refused: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(connections: _Connections) -> urllib.request.OpenerDirector:
    # Built by hand rather than with build_opener, which adds file:, ftp: and data: handlers.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        _HTTPHandler(connections),
        _HTTPSHandler(connections),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _read(
    url: str, max_bytes: int, timeout: float, deadline: float, connections: _Connections
) -> bytes:
    """Download ``url`` in a worker thread, enforcing the size limit and the deadline."""
    too_slow = FetchError(f"{url}: no complete response within {timeout:g} s")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise too_slow
    request = urllib.request.Request(
        url, headers={"User-Agent": f"ufaas/{__version__}", "Accept-Encoding": "identity"}
    )
    too_big = FetchError(f"{url}: larger than the limit of {max_bytes} bytes")
    try:
        with _opener(connections).open(request, timeout=min(SOCKET_TIMEOUT, remaining)) as resp:
            if not 200 <= resp.status < 300:
                raise FetchError(f"{url}: HTTP {resp.status} {resp.reason}")
            length = resp.headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > max_bytes:
                raise too_big
            chunks = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise too_slow
                # read1 returns after one receive; read(n) would wait for all n bytes.
                chunk = resp.read1(CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"{url}: {exc.reason}") from None
    except TimeoutError:
        # The socket timeout is cut to what is left of the deadline: say which one ran out.
        if time.monotonic() >= deadline:
            raise too_slow from None
        raise FetchError(f"{url}: the server stopped responding") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(f"{url}: {str(exc) or type(exc).__name__}") from None
