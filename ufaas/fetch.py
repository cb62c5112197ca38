"""Downloads of URL resources, over httpx on trio: http and https only, a size limit, a
deadline, a bounded share of download slots per origin, and an address policy.

The policy is checked where it cannot be dodged: when a connection is made, on the address
DNS gave, which is then the address connected to, for every redirect too. An LRU cache
keeps what was fetched, so a function run again does not fetch its resources again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
import trio

from pool import MiB

from . import __version__

CACHE_BYTES = 64 * MiB
CACHE_MAX_AGE = 300.0
CONCURRENT_DOWNLOADS = 16
DOWNLOADS_PER_ORIGIN = 2
MAX_REDIRECTS = 10
CHUNK_BYTES = 64 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REDIRECTS = (301, 302, 303, 307, 308)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """A URL could not be fetched; the message names the URL and the problem."""


class Forbidden(FetchError):
    """The address policy refuses the URL's host or one of its addresses."""


# The address ranges no URL resource may reach unless allowed, in the order they are named.
_RULES: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
    ("is_link_local", "link-local"), ("is_multicast", "multicast"),
    ("is_reserved", "reserved"), ("is_private", "private"),
)


def _unwrapped(ip: Address) -> Address:
    """The IPv4 address inside an IPv4-mapped or 6to4 IPv6 address, else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour or ip
    return ip


def _literal(host: str) -> Address | None:
    """The address a host names without DNS: ``127.0.0.1``, ``[::1]``, and the odd forms
    the C resolver also takes (``127.1``, ``0x7f000001``, ``2130706433``)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


class AddressPolicy:
    """Which hosts and addresses downloads may reach: any public one, plus ``allow``
    (CIDRs, host names, and ``*.domain`` for a domain's hosts)."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.networks: list[Network] = []
        self.names: set[str] = set()
        self.domains: list[str] = []
        for entry in allow:
            entry = entry.strip().lower()
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                self.domains.append(entry[1:])
            elif entry:
                self.names.add(entry.rstrip("."))

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` is allowed by name, whatever it resolves to."""
        host = host.lower().rstrip(".")
        return host in self.names or any(host.endswith(d) for d in self.domains)

    def refusal(self, ip: Address) -> str | None:
        """The rule that refuses ``ip``, or None when it may be reached."""
        if any(ip in net or _unwrapped(ip) in net for net in self.networks):
            return None
        # The IPv4 address inside a mapped one first: its rule is the one that says why.
        for candidate in dict.fromkeys((_unwrapped(ip), ip)):
            for attribute, rule in _RULES:
                if getattr(candidate, attribute):
                    return rule
        return None

    def check_literal(self, url: str) -> str | None:
        """Why the policy refuses ``url`` without any DNS (a literal address or
        ``localhost``), or None; used when a spec is submitted."""
        host = urlsplit(url).hostname or ""
        if self.host_allowed(host):
            return None
        if host.rstrip(".").lower() in ("localhost", "localhost.localdomain") or \
                host.lower().endswith(".localhost"):
            return "host is loopback (localhost)"
        ip = _literal(host)
        rule = self.refusal(ip) if ip is not None else None
        return None if rule is None else f"address {ip} is {rule}"


class _PolicyBackend(httpcore.TrioBackend):
    """Connects only to addresses the policy allows: resolves, checks, then connects to the
    checked address, so nothing can be rebound in between (TLS still checks the name)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        allowed_by_name = self.policy.host_allowed(host)
        literal = _literal(host)
        if literal is not None:
            candidates = [literal]
        else:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
            candidates = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        refused = []
        for ip in dict.fromkeys(candidates):
            rule = None if allowed_by_name else self.policy.refusal(ip)
            if rule is not None:
                refused.append(f"{ip} is {rule}")
                continue
            return await super().connect_tcp(str(ip), port, timeout, local_address,
                                             socket_options)
        raise Forbidden(f"address policy: {', '.join(refused)} (allow it with fetch_allow)")


class _Transport(httpx.AsyncBaseTransport):
    """httpx over an httpcore pool that uses our backend."""

    def __init__(self, policy: AddressPolicy, proxy: str | None) -> None:
        backend = _PolicyBackend(policy)
        context = ssl.create_default_context()
        self._pool: httpcore.AsyncConnectionPool
        if proxy:
            self._pool = httpcore.AsyncHTTPProxy(proxy_url=proxy, ssl_context=context,
                                                 network_backend=backend)
        else:
            self._pool = httpcore.AsyncConnectionPool(ssl_context=context,
                                                      network_backend=backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        response = await self._pool.handle_async_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream,
            extensions=request.extensions))
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Body(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


def policy_client(policy: AddressPolicy, proxy: str | None) -> httpx.AsyncClient:
    """An httpx client that connects only where ``policy`` allows, through ``proxy`` if
    given (never the environment's), follows no redirect and has no deadline of its own
    (each caller sets one)."""
    return httpx.AsyncClient(
        transport=_Transport(policy, proxy), trust_env=False,
        headers={"User-Agent": f"ufaas/{__version__}", "Accept-Encoding": "identity"},
        timeout=httpx.Timeout(None), follow_redirects=False)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


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

    A download waits for one of ``concurrency`` slots, at most ``per_origin`` of them for one
    host and port, so that one slow origin cannot hold every slot. ``timeout`` runs from the
    moment it has its slot: the wait does not count. Content fetched without a sha256 is
    cached for ``cache_max_age`` seconds; content pinned by sha256 stays until evicted.
    """

    def __init__(self, *, max_bytes: int, timeout: float, allow: Iterable[str] = (),
                 proxy: str | None = None, cache_bytes: int = CACHE_BYTES,
                 cache_max_age: float = CACHE_MAX_AGE, concurrency: int = CONCURRENT_DOWNLOADS,
                 per_origin: int = DOWNLOADS_PER_ORIGIN) -> None:
        if max_bytes <= 0 or timeout <= 0 or cache_bytes < 0 or cache_max_age < 0:
            raise ValueError("max_bytes and timeout must be > 0, cache settings >= 0")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.cache_bytes = cache_bytes
        self.cache_max_age = cache_max_age
        self.per_origin = per_origin
        self.policy = AddressPolicy(allow)
        self._proxy = proxy
        self._slots = trio.CapacityLimiter(concurrency)
        self._origins: dict[str, trio.CapacityLimiter] = {}
        self._cache: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._cached_bytes = 0
        # Content hash -> the cache key holding that content, so a pinned fetch of any URL
        # can be served by content already fetched from another.
        self._by_hash: dict[str, tuple[str, str | None]] = {}
        self._pending: dict[tuple[str, str | None], _Pending] = {}
        self._downloads = 0
        self._cache_hits = 0
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        # One client and its connections for every download (its TLS context alone costs
        # milliseconds to build); redirects are followed by hand, each hop checked.
        if self._client is None:
            self._client = policy_client(self.policy, self._proxy)
        return self._client

    def statistics(self) -> DownloaderStatistics:
        return DownloaderStatistics(
            downloads=self._downloads, cache_hits=self._cache_hits,
            cached_entries=len(self._cache), cached_bytes=self._cached_bytes,
            in_flight=len(self._pending))

    async def fetch(self, url: str, sha256: str | None = None) -> bytes:
        """The content at ``url``, checked against ``sha256`` if given; raise FetchError.

        Concurrent fetches of the same URL and hash share one download. On cancellation
        the download's connection is closed.
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
        parts = urlsplit(url)
        origin = f"{parts.hostname}:{parts.port or parts.scheme}"
        limiter = self._origins.get(origin)
        if limiter is None:
            limiter = self._origins[origin] = trio.CapacityLimiter(self.per_origin)
        try:
            async with limiter, self._slots:
                self._downloads += 1
                with trio.fail_after(self.timeout):
                    data = await self._get(url)
        except trio.TooSlowError:
            raise FetchError(f"{url}: no complete response within {self.timeout:g} s") from None
        finally:
            if limiter.borrowed_tokens == 0 and not limiter.statistics().tasks_waiting:
                self._origins.pop(origin, None)
        if sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise FetchError(f"{url}: sha256 is {digest}, expected {sha256}")
        return data

    async def _get(self, url: str) -> bytes:
        too_big = FetchError(f"{url}: larger than the limit of {self.max_bytes} bytes")
        client = self._http()
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", target) as response:
                    if response.status_code in _REDIRECTS:
                        location = response.headers.get("Location", "")
                        following = urljoin(target, location)
                        if (problem := url_problem(following)) is not None:
                            raise FetchError(f"{url}: redirect refused: {following}: "
                                             f"{problem}")
                        target = following
                        continue
                    if not 200 <= response.status_code < 300:
                        raise FetchError(f"{url}: HTTP {response.status_code} "
                                         f"{response.reason_phrase}")
                    length = response.headers.get("Content-Length", "")
                    if length.strip().isdigit() and int(length) > self.max_bytes:
                        raise too_big
                    chunks, size = [], 0
                    async for chunk in response.aiter_raw(CHUNK_BYTES):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise too_big
                        chunks.append(chunk)
                    return b"".join(chunks)
            except Forbidden as exc:
                where = "" if target == url else f" (redirected to {target})"
                raise Forbidden(f"{url}{where}: {exc}") from None
            except (httpx.HTTPError, httpcore.NetworkError, httpcore.ProtocolError,
                    httpcore.TimeoutException, ssl.SSLError, OSError) as exc:
                raise FetchError(f"{url}: {str(exc) or type(exc).__name__}") from None
        raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _lookup(self, key: tuple[str, str | None]) -> bytes | None:
        sha256 = key[1]
        for k in (key, self._by_hash.get(sha256) if sha256 else None):
            entry = self._cache.get(k) if k else None
            if entry is None or k is None:
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
        parts.port  # noqa: B018 - raises ValueError for a bad port
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
