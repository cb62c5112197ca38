"""Row 3 with ufaas's own logic taken out: what its two halves cost on this machine.

* HTTP: the same client and request as row 3 against a bare hypercorn (trio) serving a
  raw ASGI app that reads the body and answers a record-sized JSON: no Quart, no ufaas.
* agent: the in-container agent driven over one held-open exec stream by a plain
  blocking socket, run after run: no pool, no trio, no server.

Their sum is the floor of row 3 with this stack here. ``python -m bench.floors`` prints
them alone; ``python -m bench`` measures them in the same run as its rows.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
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


def http_floor(n: int, body: bytes, name: str = "bare hypercorn, raw ASGI") -> Row:
    """Row 3's request, ``n`` times over one keep-alive connection, against the bare app."""
    import http.client

    proc = subprocess.Popen([sys.executable, "-m", "bench.floors", "--serve-http"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=READY_TIMEOUT)

        def once() -> tuple[bytes, str]:
            conn.request("POST", "/fn?wait=10", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = json.loads(reply.read())
            return data["stdout"].encode(), "" if reply.status == 200 else f"{reply.status}"
        row = timed(Row(name), n, once, warmup=50)
        conn.close()
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=READY_TIMEOUT)


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


def main(argv: list[str]) -> int:
    if argv == ["--serve-http"]:
        _serve_bare()
        return 0
    import statistics

    body = json.dumps({"image": PYTHON_IMAGE, "command": ARGV}).encode()
    client = docker.from_env()
    rows = [http_floor(500, body), agent_floor(client, 500)]
    for row in rows:
        print(f"{row.name:<32} p50 {statistics.median(row.samples_ms):6.2f} ms"
              + (f"  (command {statistics.median(row.inside_ms):.2f} ms inside)"
                 if row.inside_ms else "")
              + (f"  FAILURES: {row.failures[:3]}" if row.failures else ""))
    total = sum(statistics.median(r.samples_ms) for r in rows)
    print(f"{'sum: the floor of row 3':<32} p50 {total:6.2f} ms")
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
