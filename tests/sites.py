"""A real HTTP server on 127.0.0.1 for the URL resources of tests: each test gives it its
routes, it answers in threads of its own, and it counts the requests it was sent.

A route is a function of the request (a ``BaseHTTPRequestHandler``) that writes the answer;
the functions below make the usual ones. A path with no route gets a 404.
"""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from collections.abc import Callable, Mapping

Route = Callable[["Request"], None]


class Site(http.server.ThreadingHTTPServer):
    """Serves ``routes`` from ``with Site(routes) as site:`` to the block's end, when every
    route that waits (see :attr:`stop`) returns and every handler thread is joined."""

    # Handler threads are joined on close, so none outlives its test.
    daemon_threads = False

    def __init__(self, routes: Mapping[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), Request)
        self.routes = dict(routes)
        self.requests: Counter[str] = Counter()
        # What POSTs brought, in order: (path, headers, body).
        self.posted: list[tuple[str, dict[str, str], bytes]] = []
        self.stop = threading.Event()  # set at close: a route that dawdles waits on it
        self.disconnected = threading.Event()  # a client hung up before its answer ended
        self._thread = threading.Thread(target=self.serve_forever,
                                        kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()
        self._thread.join()


class Request(http.server.BaseHTTPRequestHandler):
    server: Site

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.posted.append((self.path, dict(self.headers.items()), body))
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.server.requests[self.path] += 1
        route = self.server.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self)
        except ConnectionError:
            self.server.disconnected.set()


def send(body: bytes) -> Route:
    """200 with a Content-Length."""
    def route(request: Request) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
    return route


def unsized(size: int) -> Route:
    """200 with ``size`` bytes and no Content-Length (HTTP/1.0: the body ends when the
    connection closes), written 1 KiB at a time."""
    def route(request: Request) -> None:
        request.send_response(200)
        request.end_headers()
        for start in range(0, size, 1024):
            request.wfile.write(b"x" * min(1024, size - start))
    return route


def after(delay: float, body: bytes) -> Route:
    """``send(body)`` once ``delay`` seconds have passed (or the site closes)."""
    def route(request: Request) -> None:
        request.server.stop.wait(delay)
        send(body)(request)
    return route


def drip(interval: float, length: int = 1000) -> Route:
    """Promises ``length`` bytes, then sends one every ``interval`` seconds until the site
    closes."""
    def route(request: Request) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(length))
        request.end_headers()
        for _ in range(length):
            if request.server.stop.wait(interval):
                return
            request.wfile.write(b"x")
            request.wfile.flush()
    return route


def drip_headers(interval: float) -> Route:
    """A header line that never ends: one more byte of it every ``interval`` seconds."""
    def route(request: Request) -> None:
        request.wfile.write(b"HTTP/1.0 200 OK\r\nX-Drip: ")
        while not request.server.stop.wait(interval):
            request.wfile.write(b"x")
            request.wfile.flush()
    return route


def redirect(location: str) -> Route:
    """302 to ``location``."""
    def route(request: Request) -> None:
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()
    return route


def status(code: int) -> Route:
    """An empty answer with ``code``."""
    def route(request: Request) -> None:
        request.send_response(code)
        request.send_header("Content-Length", "0")
        request.end_headers()
    return route


def sequence(*routes: Route) -> Route:
    """Each request answered by the next of ``routes``; the last answers the rest."""
    count = [0]

    def route(request: Request) -> None:
        count[0] += 1
        routes[min(count[0], len(routes)) - 1](request)
    return route
