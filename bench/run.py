"""The benchmark suite: one trivial function (``echo hi``) on every path side by side, then
throughput, refill, memory and start-up of a real ufaas server, checked against the targets.

Run from the repository root: ``python -m bench [--json PATH] [--profile]``. Needs a Docker
engine and the test images (``python tests/images.py``). Starts its own server
(``python -m ufaas.cli`` on a free port, in its own process so that its RSS is its own and it
does not share a GIL with the load generator); stops it and removes every container it
labelled at the end, also on errors and Ctrl-C. Exits 1 when a target fails or any function
went wrong.
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker

from ._common import (
    ARGV,
    BUSYBOX_IMAGE,
    DOCKER_TIMEOUT,
    EXPECTED,
    LABELS,
    PYTHON_IMAGE,
    RUN_ID,
    WARMUP,
    Refill,
    Row,
    docker_run_row,
    exec_run_once,
    host_row,
    interleaved,
    load_average,
    percentile,
    remove_leftovers,
    summary,
    timed,
)
from .floors import agent_floor, http_floor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"
PROFILE_BASE = ROOT / "bench" / "results" / "server-profile"

# Timed runs per row: the fast rows get many, the slow docker-py rows fewer (each `docker run`
# costs ~0.4 s of a 2-core machine).
N_FAST = 300
N_EXEC = 100
N_RUN = 20
LEVELS = (1, 4, 16, 64)
PER_LEVEL = 600
RSS_AFTER = 1000
REFILLS = 5

PYTHON_MIN_IDLE = 2
# Rows 8 and 9: a main.py that imports these, then prints what every row prints. The
# python pool preloads them.
IMPORTS = ["json", "re", "datetime", "decimal", "http.client", "email", "asyncio", "sqlite3",
           "csv", "hashlib", "urllib.parse"]
MAIN_PY = f"import {', '.join(IMPORTS)}\nprint('hi')\n"
N_FRESH = 100
N_PISTON = 300
POOL_MAX = 8
BUSYBOX_MIN_IDLE = 1
BUSYBOX_MAX = 2
# The pool notices a container removed behind its back on its watch tick
# (pool._pool.DEFAULT_WATCH_INTERVAL): refills start at a random phase of it.
WATCH_INTERVAL = 2.0

WAIT = 10  # ?wait= of the latency rows
BATCH_WAIT = 30  # ?wait= under load, where up to 56 functions queue for 8 containers
HTTP_TIMEOUT = 60.0
# Open a fresh connection rather than reuse one idle this long: the server closes one idle
# for its header_timeout (10 s by default).
IDLE_RECONNECT = 5.0
READY_TIMEOUT = 60.0
WARM_TIMEOUT = 120.0
SETTLE_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL = 0.005

READY_LINE = re.compile(r"ufaas ready at (\S+)")
JSON_HEADERS = {"Content-Type": "application/json"}


class BenchError(Exception):
    """The bench could not run (server did not start, pools never warmed)."""


# -- the server, in its own process -----------------------------------------------------------

class Server:
    """A ufaas server in a child process, found by the "ufaas ready at URL" line it logs."""

    def __init__(self, config_path: Path, module: list[str] | None = None,
                 tree: Path = ROOT) -> None:
        self.argv = [sys.executable, "-m", *(module or ["ufaas.cli"]),
                     "--config", str(config_path), "--port", "0"]
        self.tree = tree  # the checkout it runs from: its cwd comes first on sys.path
        self.proc: subprocess.Popen[str] | None = None
        self.spawned_at = 0.0
        self.ready_at = 0.0
        self.url = ""
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.warnings = 0
        self._ready = threading.Event()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UFAAS_")}
        self.spawned_at = time.perf_counter()
        # Its own session: a Ctrl-C at the terminal reaches only the bench, which then stops
        # the server with one SIGTERM (a second signal would kill it before its clean-up).
        self.proc = subprocess.Popen(self.argv, cwd=self.tree, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True)
        # Drain its log all along, so that it never blocks on a full pipe.
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if " WARNING " in line or " ERROR " in line:
                self.warnings += 1
            if not self._ready.is_set() and (m := READY_LINE.search(line)):
                self.ready_at = time.perf_counter()
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        if not self._ready.wait(timeout) or not self.url:
            raise BenchError("the server did not start:\n  " + "\n  ".join(list(self.log)[-20:]))
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS in the server's /proc status")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then wait (SIGKILL after ``timeout``); return its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- where the CPU goes --------------------------------------------------------------------------

# The Docker engine's processes: the agent's exec stream passes through dockerd and the
# container's shim, so each function costs them CPU too.
ENGINE_PROCESSES = ("dockerd", "containerd", "containerd-shim", "runc")


def process_cpu_s(pid: int | str) -> float:
    """User + system CPU time process ``pid`` has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields_ = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def engine_cpu_s() -> float:
    total = 0.0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as comm:
                    name = comm.read().strip()
            except OSError:
                continue
            if name.startswith(ENGINE_PROCESSES):
                total += process_cpu_s(entry.name)
    return total


def machine_busy_s() -> float:
    """CPU time every core of the machine has spent not idle, summed."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


CPU_PARTS = ("server", "engine", "bench", "machine")


def cpu_snapshot(server: Server) -> dict[str, float]:
    return {"server": process_cpu_s(server.pid), "engine": engine_cpu_s(),
            "bench": time.process_time(), "machine": machine_busy_s()}


RUNTIME = """[[runtimes]]
language = "python"
version = "3.11.2"
image = {image}
run = ["python3", "{{file}}"]
"""


def write_config(directory: Path, python_image: str, busybox_image: str, *,
                 plain: bool = False) -> Path:
    """The bench server's config; ``plain``: without the settings older trees lack (the
    zygote's preload, the Piston runtimes), for ``bench.ab`` against any base."""
    labels = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in LABELS.items())
    text = f"""\
db = {json.dumps(str(directory / "ufaas.db"))}
shutdown_grace = 2.0
labels = {{ {labels} }}

[[pools]]
image = {json.dumps(python_image)}
min_idle = {PYTHON_MIN_IDLE}
max = {POOL_MAX}
{"" if plain else f"preload = {json.dumps(IMPORTS)}"}
{"" if plain else RUNTIME.format(image=json.dumps(python_image))}

[[pools]]
image = {json.dumps(busybox_image)}
min_idle = {BUSYBOX_MIN_IDLE}
max = {BUSYBOX_MAX}
"""
    path = directory / "ufaas.toml"
    path.write_text(text)
    return path


# -- the client -------------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP/1.1 connection. The stdlib's http.client costs ~0.1 ms of client
    CPU a request, where httpx costs 1-2 ms: that would dominate a 2-3 ms function."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.posts = 0  # functions this client submitted
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0.0

    def connect(self) -> None:
        self.close()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = conn
        self._used = time.monotonic()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        # No retry: a POST sent twice would be two functions.
        if self._conn is None or time.monotonic() - self._used > IDLE_RECONNECT:
            self.connect()
        assert self._conn is not None
        if method == "POST":
            self.posts += 1
        try:
            self._conn.request(method, path, body=body,
                               headers=JSON_HEADERS if body is not None else {})
            response = self._conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        self._used = time.monotonic()
        if response.will_close:
            self.close()
        return response.status, data

    def get_json(self, path: str) -> Any:
        status, data = self.request("GET", path)
        if status != 200:
            raise BenchError(f"GET {path}: HTTP {status}: {data[:200]!r}")
        return json.loads(data)


def outcome(status: int, data: bytes) -> tuple[dict[str, Any], str]:
    """The record in a response, and why it is not a success ("" when it is)."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}, f"HTTP {status}: {data[:80]!r}"
    if not isinstance(record, dict):
        return {}, f"HTTP {status}: not a record"
    if status != 200:
        return record, f"HTTP {status}: {record.get('error') or record.get('status')}"
    if record.get("status") != "succeeded":
        return record, f"status {record.get('status')}: {record.get('error')}"
    return record, ""


def stdout_of(record: dict[str, Any]) -> bytes:
    return str(record.get("stdout", "")).encode()


def function_body(image: str, **extra: Any) -> bytes:
    return json.dumps({"image": image, "command": ARGV, **extra}).encode()


def resources() -> list[dict[str, str]]:
    """A 1 KiB text file and 64 KiB of bytes as base64."""
    text = ("ufaas bench resource\n" * 64)[:1023] + "\n"
    blob = base64.b64encode(os.urandom(64 * 1024)).decode()
    return [{"path": "note.txt", "text": text}, {"path": "blob.bin", "base64": blob}]


def pool_stats(client: Client) -> dict[str, dict[str, Any]]:
    return {p["image"]: p for p in client.get_json("/pools")}


def wait_settled(client: Client, timeout: float = SETTLE_TIMEOUT) -> dict[str, dict[str, Any]]:
    """Wait until no pool is starting a container or running anything, each at min_idle."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool_stats(client)
        if all(p["starting"] == 0 and p["busy"] == 0 and p["queued"] == 0
               and p["warm"] >= p["min_idle"] for p in stats.values()):
            return stats
        if time.monotonic() > deadline:
            raise BenchError(f"the pools did not settle in {timeout:g} s: {stats}")
        time.sleep(0.02)


# -- start-up ---------------------------------------------------------------------------------

@dataclass
class Startup:
    ready_s: float  # spawn to the "ufaas ready" log line
    first_warm_s: float  # spawn to a pool reporting warm >= 1
    all_warm_s: float  # spawn to every configured pool at min_idle


def start(server: Server, pools: int) -> tuple[Client, Startup]:
    server.start()
    client = Client(server.wait_ready())
    first = None
    deadline = time.monotonic() + WARM_TIMEOUT
    while True:
        stats = pool_stats(client)
        now = time.perf_counter()
        if first is None and any(p["warm"] >= 1 for p in stats.values()):
            first = now
        if len(stats) >= pools and all(p["warm"] >= p["min_idle"] for p in stats.values()):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the pools were not warm after {WARM_TIMEOUT:g} s: {stats}")
        time.sleep(POLL)
    assert first is not None
    t0 = server.spawned_at
    return client, Startup(server.ready_at - t0, first - t0, now - t0)


def check_modes(client: Client, args: argparse.Namespace) -> None:
    """Rows 3 and 5 mean something only if the pools run by the agent and by plain exec."""
    stats = pool_stats(client)
    for image, mode in ((args.python_image, "agent"), (args.busybox_image, "exec")):
        if stats[image]["mode"] != mode:
            raise BenchError(f"the pool of {image} runs by {stats[image]['mode']!r}, "
                             f"not {mode!r}")


def check_images(docker_client: docker.DockerClient, images: list[str]) -> None:
    for image in images:
        try:
            docker_client.images.get(image)
        except docker.errors.ImageNotFound:
            raise BenchError(f"image {image} is missing: build the test images with "
                             "`python tests/images.py`") from None


# -- latency rows over HTTP ---------------------------------------------------------------------

@dataclass
class HttpRow:
    row: Row
    # Created -> finished as the server recorded it (ms-resolution timestamps).
    server_ms: list[float] = field(default_factory=list)


def _span_ms(record: dict[str, Any]) -> float | None:
    try:
        created = datetime.fromisoformat(record["created_at"].replace("Z", "+00:00"))
        finished = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00"))
    except (KeyError, AttributeError, TypeError, ValueError):
        return None
    return (finished - created).total_seconds() * 1000


class HttpSeries:
    """``POST /fn?wait=`` one at a time; with ``follow_image``, a first function in that
    image, then each one a follow-up (``POST /fn/{id}``) of the one before."""

    def __init__(self, client: Client, name: str, body: bytes,
                 follow_image: str | None = None, forked: bool | None = None) -> None:
        """``forked``: how each record must say it started, when it matters."""
        self.client, self.name, self.body = client, name, body
        self.forked = forked
        self.records: list[dict[str, Any]] = []
        self.follow = follow_image is not None
        self.after = ""
        if follow_image is not None:
            seed, why = outcome(*client.request("POST", f"/fn?wait={WAIT}",
                                                function_body(follow_image)))
            if why:
                raise BenchError(f"{name}: the first function failed: {why}")
            self.after = seed["id"]

    def once(self) -> tuple[bytes, str]:
        path = f"/fn/{self.after}?wait={WAIT}" if self.follow else f"/fn?wait={WAIT}"
        record, why = outcome(*self.client.request("POST", path, self.body))
        self.records.append(record)
        if self.forked is not None and record.get("forked") is not self.forked:
            why = f"{why} forked {record.get('forked')}".strip()
        if self.follow:
            self.after = record.get("id", self.after)
            if record.get("locality") != "hit":
                why = f"{why} locality {record.get('locality')}".strip()
        return stdout_of(record), why

    def result(self, row: Row) -> HttpRow:
        result = HttpRow(row)
        for record in self.records[WARMUP:]:
            if record.get("duration_ms") is not None:
                result.row.inside_ms.append(float(record["duration_ms"]))
            if (span := _span_ms(record)) is not None:
                result.server_ms.append(span)
        return result


def http_row(client: Client, name: str, n: int, body: bytes, *,
             follow_image: str | None = None, forked: bool | None = None) -> HttpRow:
    series = HttpSeries(client, name, body, follow_image, forked)
    return series.result(timed(Row(name), n, series.once))


# -- throughput ---------------------------------------------------------------------------------

@dataclass
class Level:
    concurrency: int
    count: int
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    submitted: int = 0
    lost: int = 0
    # CPU ms per function: the server, the Docker engine, this process (the load generator),
    # and the whole machine (all of those, the agents, the kernel, and whatever else runs).
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def duplicates(self) -> int:
        return len(self.ids) - len(set(self.ids))


def run_batch(url: str, concurrency: int, count: int, body: bytes,
              server: Server | None = None) -> Level:
    """``count`` functions from ``concurrency`` threads, each with its own keep-alive connection.

    Threads, not processes: http.client releases the GIL while it waits on its socket, and
    the client's ~0.1 ms of CPU a request is small beside the server's (measured below, so
    the share of the 2 cores the load generator takes is visible).
    """
    level = Level(concurrency, count)
    lock = threading.Lock()
    issued = 0
    go = threading.Event()
    stop = threading.Event()
    connected = threading.Barrier(concurrency + 1)
    clients = [Client(url) for _ in range(concurrency)]

    def worker(client: Client) -> None:
        nonlocal issued
        try:
            client.connect()
        except OSError as exc:
            level.errors.append(f"connect: {exc}")
        connected.wait()
        go.wait()
        while not stop.is_set():
            with lock:
                if issued >= count:
                    break
                i = issued
                issued += 1
            began = time.perf_counter()
            try:
                status, data = client.request("POST", f"/fn?wait={BATCH_WAIT}", body)
                record, why = outcome(status, data)
                if status == 202 and record.get("id"):
                    # Still queued or running when the wait ran out: slow, not lost.
                    record, why = outcome(*client.request(
                        "GET", f"/fn/{record['id']}?wait={BATCH_WAIT}"))
            except (OSError, http.client.HTTPException) as exc:
                record, why = {}, f"{type(exc).__name__}: {exc}"
            elapsed = (time.perf_counter() - began) * 1000
            if record.get("id"):
                level.ids.append(record["id"])
            if not why and stdout_of(record) != EXPECTED:
                why = f"stdout {stdout_of(record)[:80]!r}"
            if why:
                level.errors.append(f"function {i}: {why}")
            else:
                level.latencies_ms.append(elapsed)
        client.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        connected.wait()
        cpu0 = cpu_snapshot(server) if server else {}
        began = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        level.elapsed_s = time.perf_counter() - began
        if server:
            cpu1, done = cpu_snapshot(server), max(len(level.latencies_ms), 1)
            level.cpu_ms = {k: (cpu1[k] - cpu0[k]) * 1000 / done for k in CPU_PARTS}
    finally:
        stop.set()
        go.set()
    level.submitted = sum(c.posts for c in clients)
    return level


def check_lost(client: Client, level: Level) -> None:
    """Count functions of ``level`` the server does not hold as succeeded, and requests that
    got no id at all (the server may have queued something the client never heard of)."""
    active = client.get_json("/fn")
    records = client.get_json(f"/fn?status=all&limit={max(level.submitted, 1)}")
    succeeded = {r["id"] for r in records if r.get("status") == "succeeded"}
    level.lost = (sum(1 for i in set(level.ids) if i not in succeeded)
                  + (level.submitted - len(level.ids)) + len(active))


# -- refill -------------------------------------------------------------------------------------

def refill_once(client: Client, docker_client: docker.DockerClient, image: str) -> Refill:
    """Force-remove one idle container of ``image``'s pool behind its back; time the refill."""
    stats = wait_settled(client)[image]
    if stats["busy"] or stats["total"] != stats["warm"]:
        raise BenchError(f"the pool of {image} is not at rest: {stats}")
    found = docker_client.containers.list(filters={"label": [
        f"ufaas.bench.run={RUN_ID}", f"ufaas.pool={stats['name']}"], "status": "running"})
    if not found:
        raise BenchError(f"no running container of the pool of {image}")
    # Without a random offset, removals that follow one another lock onto the pool's watch
    # tick and always wait the same time.
    time.sleep(random.uniform(0, WATCH_INTERVAL))
    began = time.perf_counter()
    random.choice(found).remove(force=True)
    removed = time.perf_counter()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    noticed = 0.0
    while True:
        warm = pool_stats(client)[image]["warm"]
        now = time.perf_counter()
        if not noticed and warm < stats["warm"]:
            noticed = now
        elif noticed and warm >= stats["warm"]:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the pool of {image} did not refill in {SETTLE_TIMEOUT:g} s")
        time.sleep(POLL)
    return Refill(*((t - began) * 1000 for t in (removed, noticed, now)))


# -- the run ------------------------------------------------------------------------------------

@dataclass
class Results:
    rows: dict[int, Row] = field(default_factory=dict)
    server_ms: dict[int, list[float]] = field(default_factory=dict)
    levels: list[Level] = field(default_factory=list)
    refills: list[Refill] = field(default_factory=list)
    startup: Startup | None = None
    rss_idle_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_after_count: int = 0
    rss_end_mib: float = 0.0
    functions: int = 0
    server_warnings: int = 0
    # Row 3's two halves with ufaas's logic taken out (bench.floors): HTTP, agent.
    floors: list[Row] = field(default_factory=list)
    # What a zygote costs a container (zygote_memory).
    zygote: dict[str, Any] = field(default_factory=dict)


ROW_NAMES = {
    1: "docker run --rm (docker-py)",
    2: "docker exec_run (docker-py)",
    3: "ufaas POST /fn, python (agent)",
    4: "ufaas + 1 KiB text + 64 KiB b64",
    5: "ufaas busybox (exec fallback)",
    6: "ufaas follow-up POST /fn/{id}",
    7: "host subprocess.run (floor)",
    8: "ufaas main.py, fresh interpreter",
    9: "ufaas main.py, forked (zygote)",
    10: "ufaas print('hi'), as row 11 runs it",
    11: "Piston API /api/v2/execute, same",
    12: "ufaas writes 1 MiB, not collected",
    13: "ufaas writes 1 MiB, collected",
}
# Rows 10 and 11: one line of python through /fn, with what the Piston layer adds (its CPU
# limit, its stdin's newline), and through the Piston layer itself.
ONE_LINE = "print('hi')"


# Rows 12 and 13: a command that writes a 1 MiB file, then prints; row 13 also has it
# collected as an output file (kept on the server's disk).
WRITE_MIB = ["sh", "-c", "head -c 1048576 /dev/urandom > out.bin && echo hi"]
N_FILES = 200


def output_body(image: str, *, collect: bool) -> bytes:
    return json.dumps({"image": image, "command": WRITE_MIB,
                       **({"outputs": ["out.bin"]} if collect else {})}).encode()


class OutputSeries(HttpSeries):
    """Row 13: each record must list the 1 MiB file, kept whole."""

    def once(self) -> tuple[bytes, str]:
        out, why = super().once()
        files = self.records[-1].get("files") or [{}]
        if files[0].get("size") != 1 << 20 or files[0].get("truncated"):
            why = f"{why} files {files}".strip()
        return out, why


def one_line_body(image: str) -> bytes:
    return json.dumps({"image": image, "command": ["python3", "main.py"],
                       "resources": [{"path": "main.py", "text": ONE_LINE}],
                       "stdin": "\n", "timeout": 3, "cpu_limit": 3}).encode()


PISTON_BODY = json.dumps({"language": "python", "version": "3.x",
                          "files": [{"name": "main.py", "content": ONE_LINE}]}).encode()


class PistonSeries:
    """``POST /api/v2/execute`` one at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def once(self) -> tuple[bytes, str]:
        status, data = self.client.request("POST", "/api/v2/execute", PISTON_BODY)
        try:
            run = json.loads(data)["run"]
        except (ValueError, KeyError, TypeError):
            return b"", f"HTTP {status}: {data[:80]!r}"
        why = "" if status == 200 and run.get("code") == 0 else f"HTTP {status}: {run}"
        return str(run.get("stdout", "")).encode(), why


def main_body(image: str, *, fresh: bool) -> bytes:
    return json.dumps({"image": image, "command": ["python3", "main.py"],
                       "resources": [{"path": "main.py", "text": MAIN_PY}],
                       "fresh_interpreter": fresh}).encode()


def zygote_pss_mib(container_id: str) -> float:
    """The proportional memory of a container's zygote and its spare, read from this host's
    /proc (the engine is local; inside, their memory is closed to everyone): pages they
    share with each other, or with the agent, are counted in shares."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if len(argv) < 3 or not argv[2].startswith(b'"""The zygote'):
                continue
            if container_id not in Path(f"/proc/{pid}/cgroup").read_text():
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            return float("nan")
    return total / 1024 if total else float("nan")


def zygote_memory(client: Client, docker_client: docker.DockerClient, image: str
                  ) -> dict[str, Any]:
    """What a zygote costs one container: its own and its spare's proportional share of
    memory (pages they share with each other, or the agent, counted once), and the
    zygote's resident size as the pool reports it."""
    stats = pool_stats(client)[image]
    found = docker_client.containers.list(filters={"label": [
        f"ufaas.bench.run={RUN_ID}", f"ufaas.pool={stats['name']}"], "status": "running"})
    if not found:
        raise BenchError(f"no running container of the pool of {image}")
    pss = zygote_pss_mib(found[0].id or "")
    zygote = stats.get("zygote") or {}
    return {"pss_mib": pss, "rss_mib": (zygote.get("rss") or 0) / (1 << 20),
            "preload": zygote.get("preload"), "failed": zygote.get("failed")}


def measure(args: argparse.Namespace, server: Server, docker_client: docker.DockerClient,
            res: Results) -> None:
    n = args.n
    say = print if args.verbose else (lambda *a, **k: None)
    client, res.startup = start(server, pools=2)
    check_modes(client, args)
    say(f"server {server.url} pid {server.pid}; ready in {res.startup.ready_s:.2f} s")
    wait_settled(client)
    res.rss_idle_mib = server.rss_mib()

    say("refill ...")
    res.refills = [refill_once(client, docker_client, args.python_image)
                   for _ in range(REFILLS)]

    say("rows 7 and 1 (around ufaas) ...")
    res.rows[7] = host_row(n, ROW_NAMES[7])
    res.rows[1] = docker_run_row(docker_client, args.python_image, args.n_run, ROW_NAMES[1])
    plain = function_body(args.python_image)
    say("floors of row 3 ...")
    res.floors = [http_floor(n, plain), agent_floor(docker_client, n, args.python_image)]

    say("rows 3-6 (ufaas) ...")
    # The rows a target compares are timed in alternating blocks: 3 with 6 and 9, 5 with 2.
    # Small blocks for row 6: the other rows' functions land in the same warm container,
    # which keeps only the 16 latest working directories (pool.DEFAULT_WORKDIRS_KEPT);
    # more than 16 between two follow-ups would make the next one a locality miss. Row 4
    # last, since its 88 KB records can slow the functions that come right after them.
    wait_settled(client)
    # A follow-up may leave out the image: it runs where the function before it ran.
    row3 = HttpSeries(client, ROW_NAMES[3], plain)
    row6 = HttpSeries(client, ROW_NAMES[6], json.dumps({"command": ARGV}).encode(),
                      args.python_image)
    # Row 9 with them: its target is a ratio to row 3.
    row9 = HttpSeries(client, ROW_NAMES[9], main_body(args.python_image, fresh=False),
                      forked=True)
    timed_rows = {3: Row(ROW_NAMES[3]), 6: Row(ROW_NAMES[6]), 9: Row(ROW_NAMES[9])}
    interleaved([(timed_rows[3], row3.once), (timed_rows[6], row6.once),
                 (timed_rows[9], row9.once)], n)
    wait_settled(client)
    row5 = HttpSeries(client, ROW_NAMES[5], function_body(args.busybox_image))
    timed_rows.update({2: Row(ROW_NAMES[2]), 5: Row(ROW_NAMES[5])})
    with exec_run_once(docker_client, args.python_image) as exec_run:
        interleaved([(timed_rows[2], exec_run), (timed_rows[5], row5.once)], args.n_exec)
    res.rows[2] = timed_rows[2]
    for number, series in ((3, row3), (6, row6), (9, row9), (5, row5)):
        got = series.result(timed_rows[number])
        res.rows[number], res.server_ms[number] = got.row, got.server_ms
    wait_settled(client)
    got = http_row(client, ROW_NAMES[4], n, function_body(args.python_image,
                                                         resources=resources()))
    res.rows[4], res.server_ms[4] = got.row, got.server_ms

    say("rows 10 and 11 (one line of python: /fn and the Piston API) ...")
    wait_settled(client)
    row10 = HttpSeries(client, ROW_NAMES[10], one_line_body(args.python_image), forked=True)
    row11 = PistonSeries(client)
    timed_rows.update({10: Row(ROW_NAMES[10]), 11: Row(ROW_NAMES[11])})
    interleaved([(timed_rows[10], row10.once), (timed_rows[11], row11.once)], args.n_piston)
    res.rows[11] = timed_rows[11]
    got = row10.result(timed_rows[10])
    res.rows[10], res.server_ms[10] = got.row, got.server_ms

    say("rows 12 and 13 (a 1 MiB file written, then collected or not) ...")
    wait_settled(client)
    row12 = HttpSeries(client, ROW_NAMES[12], output_body(args.python_image, collect=False))
    row13 = OutputSeries(client, ROW_NAMES[13], output_body(args.python_image, collect=True))
    timed_rows.update({12: Row(ROW_NAMES[12]), 13: Row(ROW_NAMES[13])})
    interleaved([(timed_rows[12], row12.once), (timed_rows[13], row13.once)], args.n_files)
    for number, series in ((12, row12), (13, row13)):
        got = series.result(timed_rows[number])
        res.rows[number], res.server_ms[number] = got.row, got.server_ms

    say("row 8 (main.py in a fresh interpreter) ...")
    wait_settled(client)
    got = http_row(client, ROW_NAMES[8], args.n_fresh,
                   main_body(args.python_image, fresh=True), forked=False)
    res.rows[8], res.server_ms[8] = got.row, got.server_ms
    res.zygote = zygote_memory(client, docker_client, args.python_image)

    functions = client.posts
    if functions < RSS_AFTER:
        wait_settled(client)
        functions += run_batch(server.url, 4, RSS_AFTER - functions, plain).submitted
    res.rss_after_mib, res.rss_after_count = server.rss_mib(), functions

    for c in LEVELS:
        say(f"throughput at concurrency {c} ...")
        # Let the pool grow to what this level needs before timing it.
        warm = run_batch(server.url, c, max(2 * c, 20), plain)
        functions += warm.submitted
        wait_settled(client)
        level = run_batch(server.url, c, args.per_level, plain, server)
        functions += level.submitted
        level.errors = warm.errors + level.errors
        check_lost(client, level)
        res.levels.append(level)
    res.rss_end_mib = server.rss_mib()
    res.functions = functions
    client.close()


def profile_row3(args: argparse.Namespace, server: Server) -> Row:
    """Row 3 alone, with the server's profiler on (SIGUSR1) and off again (SIGUSR2)."""
    client, _ = start(server, pools=2)
    check_modes(client, args)
    body = function_body(args.python_image)
    wait_settled(client)
    http_row(client, "warm-up", 50, body)
    server.signal(signal.SIGUSR1)
    time.sleep(0.2)
    got = http_row(client, ROW_NAMES[3] + " (profiled)", args.n, body)
    server.signal(signal.SIGUSR2)
    time.sleep(0.2)
    client.close()
    return got.row


# -- output -------------------------------------------------------------------------------------

def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def targets(res: Results) -> list[tuple[str, bool, str]]:
    r = {k: p50(row.samples_ms) for k, row in res.rows.items()}
    by_c = {lv.concurrency: lv for lv in res.levels}
    refill = p50([x.refilled_ms for x in res.refills])
    out = [
        ("row 3 p50 <= 4 ms", r[3] <= 4, f"{r[3]:.2f} ms"),
        ("row 3 >= 15x faster than row 2", r[2] / r[3] >= 15, f"{r[2] / r[3]:.1f}x"),
        ("row 3 >= 100x faster than row 1", r[1] / r[3] >= 100, f"{r[1] / r[3]:.0f}x"),
        ("row 4 p50 <= 6 ms", r[4] <= 6, f"{r[4]:.2f} ms"),
        ("row 6 p50 <= row 3 p50 + 1 ms", r[6] <= r[3] + 1,
         f"{r[6]:.2f} vs {r[3] + 1:.2f} ms"),
        ("row 5 p50 <= row 2 p50 + 10 ms", r[5] <= r[2] + 10,
         f"{r[5]:.1f} vs {r[2] + 10:.1f} ms"),
    ]
    if 8 in r and 9 in r:
        out += [
            ("row 9 (forked) >= 10x faster than row 8 (fresh)", r[8] / r[9] >= 10,
             f"{r[8] / r[9]:.1f}x"),
            ("row 9 p50 <= 2x row 3 p50", r[9] <= 2 * r[3], f"{r[9]:.2f} vs {2 * r[3]:.2f} ms"),
        ]
    if 10 in r and 11 in r:
        out.append(("row 11 (Piston API) p50 <= row 10 p50 + 0.5 ms", r[11] <= r[10] + 0.5,
                    f"{r[11]:.2f} vs {r[10] + 0.5:.2f} ms"))
    if 16 in by_c:
        out.append((">= 300 functions/s at concurrency 16", by_c[16].per_s >= 300,
                    f"{by_c[16].per_s:.0f}/s"))
    if 64 in by_c:
        lv = by_c[64]
        out.append(("no errors, none lost at concurrency 64",
                    not lv.errors and not lv.lost and not lv.duplicates,
                    f"{len(lv.errors)} errors, {lv.lost} lost, {lv.duplicates} duplicate ids"))
    out += [
        ("refill p50 <= 600 ms", refill <= 600, f"{refill:.0f} ms"),
        ("idle RSS <= 70 MB", res.rss_idle_mib <= 70, f"{res.rss_idle_mib:.1f} MiB"),
        (f"RSS after {res.rss_after_count:,} functions <= idle + 30 MB",
         res.rss_after_mib <= res.rss_idle_mib + 30,
         f"{res.rss_after_mib:.1f} MiB (+{res.rss_after_mib - res.rss_idle_mib:.1f})"),
    ]
    failures = sum(len(row.failures) for row in [*res.rows.values(), *res.floors])
    out.append(("every row's output was 'hi\\n'", failures == 0, f"{failures} failures"))
    return out


def print_report(res: Results, checks: list[tuple[str, bool, str]]) -> None:
    base = p50(res.rows[3].samples_ms)
    head = (f"{'#':>1}  {'echo hi, one at a time':<34} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'mean ms':>8} {'/row 3':>7} {'fail':>4}")
    print(head)
    print("-" * len(head))
    for number in sorted(res.rows):
        s = summary(res.rows[number], base)
        ratio = float(s["ratio"])  # type: ignore[arg-type]
        print(f"{number:>1}  {s['row']:<34} {s['n']:>4} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
              f"{s['mean_ms']:>8.2f} {ratio:>6.{2 if ratio < 10 else 0}f}x {s['failures']:>4}")
    print()
    for number in (3, 4, 5, 6, 8, 9):
        if number not in res.rows:
            continue
        row, span = res.rows[number], statistics.fmean(res.server_ms[number] or [0])
        print(f"row {number}: command ran {p50(row.inside_ms):.2f} ms inside the container "
              f"(p50); server created->finished {span:.1f} ms (mean, ms-resolution stamps)")
    if 12 in res.rows and 13 in res.rows:
        added = p50(res.rows[13].samples_ms) - p50(res.rows[12].samples_ms)
        print(f"collecting one 1 MiB output file adds {added:.2f} ms p50 (row 13 - row 12)")
    if res.floors:
        print("\nrow 3 with ufaas's own logic taken out (python -m bench.floors):")
        for row in res.floors:
            inside = (f"; the command {p50(row.inside_ms):.2f} ms inside"
                      if row.inside_ms else "")
            print(f"   {row.name:<34} p50 {p50(row.samples_ms):6.2f} ms{inside}")
        floor = sum(p50(r.samples_ms) for r in res.floors)
        print(f"   {'sum: the floor of row 3 here':<34} p50 {floor:6.2f} ms; ufaas adds "
              f"{base - floor:.2f} ms")

    print()
    head = (f"{'concurrency':>11} {'functions':>9} {'s':>6} {'fn/s':>7} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'errors':>6} {'lost':>4} {'dup':>3}  CPU ms/fn: "
            + " ".join(f"{k:>7}" for k in CPU_PARTS))
    print(head)
    print("-" * len(head))
    for lv in res.levels:
        lat = lv.latencies_ms or [float("nan")]
        print(f"{lv.concurrency:>11} {lv.count:>9} {lv.elapsed_s:>6.2f} {lv.per_s:>7.0f} "
              f"{p50(lat):>8.2f} {percentile(lat, 99):>8.2f} {len(lv.errors):>6} {lv.lost:>4} "
              f"{lv.duplicates:>3}             "
              + " ".join(f"{lv.cpu_ms.get(k, 0):>7.2f}" for k in CPU_PARTS))
    print("CPU ms/fn: server = the ufaas process; engine = dockerd, containerd and the shims; "
          "bench = this\nprocess, whose threads generate the load on the same 2 cores; "
          "machine = all CPU time spent\n(those, the agents, the kernel, other work)")

    print()
    refills = res.refills
    print(f"refill of the python pool after a force-remove, median of {len(refills)}: "
          f"{p50([r.refilled_ms for r in refills]):.0f} ms = noticed after "
          f"{p50([r.noticed_ms for r in refills]):.0f} ms (the pool's {WATCH_INTERVAL:g} s watch "
          f"tick) + started in {p50([r.refilled_ms - r.noticed_ms for r in refills]):.0f} ms")
    print("  samples (remove call / noticed / refilled, ms): " + ", ".join(
        f"{r.remove_ms:.0f}/{r.noticed_ms:.0f}/{r.refilled_ms:.0f}" for r in refills))
    print(f"server RSS: idle {res.rss_idle_mib:.1f} MiB; after {res.rss_after_count:,} functions "
          f"{res.rss_after_mib:.1f} MiB; at the end ({res.functions:,} functions) "
          f"{res.rss_end_mib:.1f} MiB")
    if res.startup:
        st = res.startup
        print(f"start-up from process spawn: 'ready' logged at {st.ready_s:.2f} s, first warm "
              f"container at {st.first_warm_s:.2f} s, both pools at min_idle at "
              f"{st.all_warm_s:.2f} s")
    if res.zygote:
        z = res.zygote
        print(f"a zygote per warm container (preload: {len(z['preload'] or [])} modules"
              f"{', failed: ' + ', '.join(z['failed']) if z['failed'] else ''}): "
              f"{z['pss_mib']:.1f} MiB proportional (zygote + its spare), "
              f"the zygote {z['rss_mib']:.1f} MiB resident")
    if res.server_warnings:
        print(f"the server logged {res.server_warnings} warning/error lines")

    print()
    width = max(len(name) for name, _, _ in checks)
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {value}")


def write_json(path: Path, res: Results, checks: list[tuple[str, bool, str]],
               extra: dict[str, Any]) -> None:
    base = p50(res.rows[3].samples_ms)
    data = {
        "argv": ARGV,
        "rows": {n: summary(r, base) for n, r in sorted(res.rows.items())},
        "samples_ms": {n: r.samples_ms for n, r in sorted(res.rows.items())},
        "inside_ms": {n: r.inside_ms for n, r in sorted(res.rows.items()) if r.inside_ms},
        "server_ms": res.server_ms,
        "failures": {n: r.failures for n, r in sorted(res.rows.items()) if r.failures},
        "floors": [{**summary(r, base), "inside_p50_ms": p50(r.inside_ms)}
                   for r in res.floors],
        "throughput": [{
            "concurrency": lv.concurrency, "count": lv.count, "elapsed_s": lv.elapsed_s,
            "per_s": lv.per_s, "p50_ms": p50(lv.latencies_ms),
            "p99_ms": percentile(lv.latencies_ms, 99) if lv.latencies_ms else None,
            "errors": lv.errors, "lost": lv.lost, "duplicates": lv.duplicates,
            "cpu_ms_per_fn": lv.cpu_ms,
        } for lv in res.levels],
        "refills": [asdict(r) for r in res.refills],
        "rss_mib": {"idle": res.rss_idle_mib, "after": res.rss_after_mib,
                    "after_functions": res.rss_after_count, "end": res.rss_end_mib,
                    "end_functions": res.functions},
        "startup_s": asdict(res.startup) if res.startup else None,
        "zygote": res.zygote,
        "targets": [{"target": name, "pass": ok, "value": value} for name, ok, value in checks],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", type=Path, default=DEFAULT_JSON,
                        help="where to save the results (default bench/results/latest.json)")
    parser.add_argument("--n", type=int, default=N_FAST,
                        help="timed runs of each fast row (default %(default)s)")
    parser.add_argument("--n-exec", type=int, default=N_EXEC,
                        help="timed runs of rows 2 and 5 (default %(default)s)")
    parser.add_argument("--n-run", type=int, default=N_RUN,
                        help="timed runs of row 1, `docker run` (default %(default)s)")
    parser.add_argument("--n-fresh", type=int, default=N_FRESH,
                        help="timed runs of row 8, main.py fresh (default %(default)s)")
    parser.add_argument("--n-files", type=int, default=N_FILES,
                        help="timed runs of rows 12 and 13 (%(default)s)")
    parser.add_argument("--n-piston", type=int, default=N_PISTON,
                        help="timed runs of rows 10 and 11, the Piston API (default %(default)s)")
    parser.add_argument("--per-level", type=int, default=PER_LEVEL,
                        help="functions per throughput level (default %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: run row 3 against a server under pyinstrument and "
                        "write its profile to bench/results/server-profile.*")
    parser.add_argument("--python-image", default=PYTHON_IMAGE)
    parser.add_argument("--busybox-image", default=BUSYBOX_IMAGE)
    parser.add_argument("-v", "--verbose", action="store_true", help="say what runs now")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends the bench like Ctrl-C: through the finally below, which cleans up. SIGINT
    # too, even when started in the background (where the shell would have it ignored).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.perf_counter()
    load_start = load_average()
    print(f"1-min load average at start: {load_start:.2f} on {os.cpu_count()} CPUs (other "
          "work on this machine, such as other engineers' tests, skews every row)", flush=True)
    try:
        docker_client = docker.from_env(timeout=DOCKER_TIMEOUT)
        check_images(docker_client, [args.python_image, args.busybox_image])
    except (docker.errors.DockerException, BenchError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    res = Results()
    status: int | None = None
    profile_row: Row | None = None
    with tempfile.TemporaryDirectory(prefix="ufaas-bench-") as tmp:
        config = write_config(Path(tmp), args.python_image, args.busybox_image)
        module = ["bench._profiled", str(PROFILE_BASE), "--"] if args.profile else None
        server = Server(config, module)
        try:
            if args.profile:
                PROFILE_BASE.parent.mkdir(parents=True, exist_ok=True)
                profile_row = profile_row3(args, server)
            else:
                measure(args, server, docker_client, res)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            status = 130
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            status = 2
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            code = server.stop()
            left = remove_leftovers(docker_client)
            docker_client.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if code not in (None, 0):
            print(f"warning: the server exited with status {code}; its last lines:\n  "
                  + "\n  ".join(list(server.log)[-10:]), file=sys.stderr)
        if left:
            print(f"warning: {left} container(s) were still there at the end; removed them",
                  file=sys.stderr)
    res.server_warnings = server.warnings
    if status is not None:
        return status

    if profile_row is not None:
        s = summary(profile_row, p50(profile_row.samples_ms))
        print(f"{profile_row.name}: n {s['n']}, p50 {s['p50_ms']:.2f} ms, "
              f"p99 {s['p99_ms']:.2f} ms, failures {s['failures']}")
        flat = Path(f"{PROFILE_BASE}.flat.txt")
        if flat.exists():
            print(f"\nthe server's top self-time while row 3 ran ({flat.name}):")
            print("\n".join(flat.read_text().splitlines()[:40]))
        print(f"\nfull profile: bench/results/{PROFILE_BASE.name}.{{txt,flat.txt,html}}")
        return 1 if profile_row.failures else 0

    checks = targets(res)
    print()
    print_report(res, checks)
    load_end = load_average()
    total = time.perf_counter() - began
    print(f"\n1-min load average: {load_start:.2f} at start, {load_end:.2f} at end, on "
          f"{os.cpu_count()} CPUs (other engineers' tests may be running; they skew every row)"
          f"; total {total:.0f} s")
    failures = {n: r.failures for n, r in sorted(res.rows.items()) if r.failures}
    for number, items in failures.items():
        for item in items[:5]:
            print(f"  row {number}: {item}")
    for lv in res.levels:
        for item in lv.errors[:5]:
            print(f"  concurrency {lv.concurrency}: {item}")
    write_json(args.json, res, checks, {
        "load_average": [load_start, load_end], "cpus": os.cpu_count(), "total_s": total,
        "run_id": RUN_ID,
    })
    try:
        shown = args.json.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = args.json
    print(f"saved {shown}")
    return 0 if all(ok for _, ok, _ in checks) else 1
