"""Row 3 with ufaas's own logic taken out: what its two halves cost on this machine.

* HTTP: the same client and request as row 3 against a bare hypercorn (trio) serving a
  raw ASGI app that reads the body and answers a record-sized JSON: no Quart, no ufaas.
* agent: the in-container agent driven over one held-open exec stream by a plain
  blocking socket, run after run: no pool, no trio, no server.
* link (bench.cluster's hop): a front's two messages to a node and back, between two trio
  processes, a run's size out and a result's back, nothing of ufaas around them: over
  trio-websocket, as the cluster link goes, and over a bare trio TCP stream.

Their sum is the floor of row 3 with this stack here. ``python -m bench.floors`` prints
them alone; ``python -m bench`` measures them in the same run as its rows.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import docker

from pool._runner import AGENT_CAPABILITIES, agent_argv

from ._common import ARGV, LABELS, PYTHON_IMAGE, Row, timed

_HEAD = struct.Struct(">II")  # the agent's frames: header length, body length
_DOCKER = struct.Struct(">BxxxL")  # the engine's stream frames: fd, length
READY_TIMEOUT = 30.0


# -- HTTP --------------------------------------------------------------------------------------

async def _bare_app(scope: Any, receive: Any, send: Any) -> None:
    """A raw ASGI app: reads the body, answers a JSON object the size of a function record."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    data = json.dumps({"status": "succeeded", "stdout": "hi\n", "read": size,
                       "padding": "x" * 480}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _serve_bare() -> None:
    """Run in a child process: serve the bare app on a free port, print the port."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def main() -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, _bare_app, config)
            print(binds[0].rsplit(":", 1)[1], flush=True)

    trio.run(main)


@contextlib.contextmanager
def _serving(*flags: str) -> Iterator[int]:
    """``python -m bench.floors FLAGS`` in a child process, serving until the block ends:
    yields the port it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.floors", *flags],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(timeout=READY_TIMEOUT)


def http_floor(n: int, body: bytes, name: str = "bare hypercorn, raw ASGI") -> Row:
    """Row 3's request, ``n`` times over one keep-alive connection, against the bare app."""
    import http.client

    with _serving("--serve-http") as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READY_TIMEOUT)

        def once() -> tuple[bytes, str]:
            conn.request("POST", "/fn?wait=10", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = json.loads(reply.read())
            return data["stdout"].encode(), "" if reply.status == 200 else f"{reply.status}"
        row = timed(Row(name), n, once, warmup=50)
        conn.close()
        return row


# -- agent -------------------------------------------------------------------------------------

class _AgentLink:
    """The agent in a container, over the exec stream's raw socket, one frame at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()  # the engine's multiplexed stream
        self.out = bytearray()  # the agent's stdout, demultiplexed

    def send(self, header: dict[str, object]) -> None:
        data = json.dumps(header, separators=(",", ":")).encode()
        self.sock.sendall(_HEAD.pack(len(data), 0) + data)

    def receive(self) -> dict[str, object]:
        while True:
            self._demux()
            if len(self.out) >= _HEAD.size:
                hlen, blen = _HEAD.unpack_from(self.out)
                end = _HEAD.size + hlen + blen
                if len(self.out) >= end:
                    header = json.loads(bytes(self.out[_HEAD.size:_HEAD.size + hlen]))
                    header["body"] = bytes(self.out[_HEAD.size + hlen:end])
                    del self.out[:end]
                    return header
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the agent's stream ended")
            self.raw += chunk

    def _demux(self) -> None:
        while len(self.raw) >= _DOCKER.size:
            fd, size = _DOCKER.unpack_from(self.raw)
            if len(self.raw) < _DOCKER.size + size:
                return
            if fd == 1:
                self.out += self.raw[_DOCKER.size:_DOCKER.size + size]
            del self.raw[:_DOCKER.size + size]


def agent_floor(client: docker.DockerClient, n: int, image: str = PYTHON_IMAGE,
                name: str = "agent round trip, raw socket") -> Row:
    """Row 3's command through the agent, with nothing of ufaas around it: the agent is the
    container's main process, as in a pool, reached over its attached stream."""
    api = client.api
    host_config = api.create_host_config(
        init=True, network_mode="none", cap_drop=["ALL"], cap_add=list(AGENT_CAPABILITIES),
        security_opt=["no-new-privileges"], read_only=True,
        tmpfs={"/tmp": "size=64m,mode=1777", "/tmp/ufaas": "size=64m,mode=1733,exec"})
    created = api.create_container(image, agent_argv("65534:65534"), labels=LABELS,
                                   user="0:0", stdin_open=True, host_config=host_config)
    container = client.containers.get(created["Id"])
    try:
        sock = api.attach_socket(created["Id"], params={
            "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})._sock
        container.start()
        sock.settimeout(READY_TIMEOUT)
        link = _AgentLink(sock)
        link.send({"op": "hello"})
        assert link.receive()["ev"] == "hello"
        row = Row(name)
        count = 0

        def once() -> tuple[bytes, str]:
            nonlocal count
            count += 1
            link.send({"op": "run", "id": str(count), "argv": ARGV, "env": {},
                       "workdir": f"w{count}", "files": [], "timeout": 10, "stdin_eof": True,
                       "cap": 1 << 20, "drop": [f"w{count - 1}"]})
            stdout = b""
            while (frame := link.receive())["ev"] != "exit":
                stdout += frame["body"] if frame.get("fd") == 1 else b""  # type: ignore[operator]
            row.inside_ms.append(float(frame["duration_ms"]))  # type: ignore[arg-type]
            return stdout, "" if frame.get("exit_code") == 0 else f"{frame}"
        timed(row, n, once, warmup=50)
        row.inside_ms = row.inside_ms[50:]
        sock.close()
        return row
    finally:
        container.remove(force=True)


# -- the cluster link ------------------------------------------------------------------------

# About the sizes of a warm ``echo hi``'s run message and its result in wire 5.
RUN_BYTES, RESULT_BYTES = 500, 400
_LENGTH = struct.Struct(">I")


async def _read_frame(stream: Any, buf: bytearray) -> bytes | None:
    """One length-prefixed frame off ``stream`` (whatever follows it stays in ``buf``);
    None at the stream's end."""
    while len(buf) < _LENGTH.size or len(buf) < _LENGTH.size + _LENGTH.unpack_from(buf)[0]:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    size = _LENGTH.unpack_from(buf)[0]
    frame = bytes(buf[_LENGTH.size:_LENGTH.size + size])
    del buf[:_LENGTH.size + size]
    return frame


def _serve_link(kind: str) -> None:
    """Run in a child process: answer each message with a result-sized one, print the port."""
    import trio
    from trio_websocket import serve_websocket

    answer = b"r" * RESULT_BYTES

    async def on_socket(request: Any) -> None:
        ws = await request.accept()
        while True:
            await ws.get_message()
            await ws.send_message(answer)

    async def on_stream(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while await _read_frame(stream, buf) is not None:
            await stream.send_all(_LENGTH.pack(len(answer)) + answer)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if kind == "websocket":
                server = await nursery.start(serve_websocket, on_socket, "127.0.0.1", 0, None)
                port = server.port
            else:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, on_stream, 0, host="127.0.0.1"))
                port = listeners[0].socket.getsockname()[1]
            print(port, flush=True)

    trio.run(main)


def link_floor(n: int, kind: str = "websocket") -> Row:
    """``n`` round trips, one at a time, of a run-sized message and a result-sized answer
    to another trio process: over trio-websocket (``kind`` "websocket") or a bare TCP
    stream ("tcp")."""
    import time

    import trio
    from trio_websocket import open_websocket

    row = Row(f"link round trip, {'trio-websocket' if kind == 'websocket' else 'bare trio TCP'}")
    out = b"j" * RUN_BYTES

    async def times(send: Any, receive: Any) -> None:
        for i in range(n + 50):
            began = time.perf_counter()
            await send(out)
            got = await receive()
            if len(got) != RESULT_BYTES:
                row.failures.append(f"{len(got)} bytes back")
            if i >= 50:  # the first ones warm both ends up
                row.samples_ms.append((time.perf_counter() - began) * 1000)

    async def main(port: int) -> None:
        with trio.fail_after(READY_TIMEOUT + n):
            if kind == "websocket":
                async with open_websocket("127.0.0.1", port, "/", use_ssl=False) as ws:
                    await times(ws.send_message, ws.get_message)
                return
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            buf = bytearray()

            async def send(data: bytes) -> None:
                await stream.send_all(_LENGTH.pack(len(data)) + data)

            async def receive() -> bytes:
                return await _read_frame(stream, buf) or b""
            async with stream:
                await times(send, receive)
    with _serving("--serve-link", kind) as port:
        trio.run(main, port)
    return row


def main(argv: list[str]) -> int:
    if argv == ["--serve-http"]:
        _serve_bare()
        return 0
    if argv[:1] == ["--serve-link"]:
        _serve_link(argv[1])
        return 0
    import statistics

    body = json.dumps({"image": PYTHON_IMAGE, "command": ARGV}).encode()
    client = docker.from_env()
    rows = [http_floor(500, body), agent_floor(client, 500)]
    links = [link_floor(500, "websocket"), link_floor(500, "tcp")]
    for row in rows + links:
        print(f"{row.name:<32} p50 {statistics.median(row.samples_ms):6.2f} ms"
              + (f"  (command {statistics.median(row.inside_ms):.2f} ms inside)"
                 if row.inside_ms else "")
              + (f"  FAILURES: {row.failures[:3]}" if row.failures else ""))
    total = sum(statistics.median(r.samples_ms) for r in rows)
    print(f"{'sum: the floor of row 3':<32} p50 {total:6.2f} ms")
    print("(the link rows are the floor of bench.cluster's extra hop: its two messages)")
    return 1 if any(r.failures for r in rows + links) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
