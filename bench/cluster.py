"""The cluster bench, on the lab Swarm of tests/lab.py: a warm call through a front to a
``ufaas node`` beside one to the front's own engine, in the same run (the hop alone: a
node process of this machine on that same engine; and to a lab node, whose nested engine
adds its own cost, measured apart as the agent's raw round trip on each engine);
throughput with 1, 2 and 3 nodes; the time from a node joining to its first warm
container; and how long each fault of a node takes to end its running function.

Run from the repository root: ``python -m bench.cluster [--json PATH] [--only SECTION]``
(``--only hop`` times the extra hop alone, in about a minute). Needs the lab's
images (``python tests/lab.py build``); brings the lab up and takes it down at the end
(``--keep`` leaves it up). Every front is a ``ufaas`` process of its own, as in
``python -m bench``; every node is ``ufaas node`` in a container on a lab node's engine.
The lab's three nodes and the front share this machine's cores: the throughput figures
show what the front and the hop cost, not what three machines would do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker

from ._common import (
    BUSYBOX_IMAGE,
    LABELS,
    PYTHON_IMAGE,
    WARMUP,
    Row,
    interleaved,
    remove_leftovers,
)
from .floors import agent_floor, link_floor
from .run import (
    BenchError,
    Client,
    HttpSeries,
    Server,
    function_body,
    outcome,
    process_cpu_s,
    run_batch,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "cluster.json"
TOKEN = "bench-cluster-token"
# Beats as a user gets them: the stated deadlines are these defaults' (config.py).
NODE_ENV = {"UFAAS_CLUSTER_TOKEN": TOKEN, "UFAAS_CLUSTER_FRONT_GRACE": "5"}
N_HOP = 300
HOST_NODE = "bench-host-node"  # the ufaas node the hop's own row runs on this machine
CONCURRENCY = 16
PER_LEVEL = 600
JOINS = 3
WARM_TIMEOUT = 120.0
POLL = 0.02
HEARTBEAT, NODE_TIMEOUT = 1.0, 5.0  # ClusterConfig's defaults, which the fronts keep


def load_lab() -> Any:
    """tests/lab.py, which is not a package."""
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("lab")


def write_config(directory: Path, name: str, nodes: list[str] | None, *, min_idle: int,
                 pool_max: int, image: str = PYTHON_IMAGE) -> Path:
    labels = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in LABELS.items())
    text = f"""\
db = {json.dumps(str(directory / f"{name}.db"))}
shutdown_grace = 2.0
labels = {{ {labels} }}

[[pools]]
image = {json.dumps(image)}
min_idle = {min_idle}
max = {pool_max}
"""
    if nodes is not None:
        text += f"""
[cluster]
nodes = {json.dumps(nodes)}
token = {json.dumps(TOKEN)}
local = false
"""
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def front(config: Path) -> Iterator[tuple[Server, Client]]:
    server = Server(config)
    server.start()
    try:
        client = Client(server.wait_ready())
        yield server, client
        client.close()
    finally:
        server.stop()


def wait_until(what: str, check: Callable[..., bool], *args: Any,
               timeout: float = WARM_TIMEOUT) -> float:
    """Poll ``check(*args)`` until true; the perf_counter time it first was."""
    deadline = time.monotonic() + timeout
    while not check(*args):
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)
    return time.perf_counter()


def warm(client: Client, node: str | None, count: int = 1) -> bool:
    return sum(p["warm"] for p in client.get_json("/pools") if p["node"] == node) >= count


def status_is(client: Client, fid: str, wanted: str) -> bool:
    return bool(client.get_json(f"/fn/{fid}")["status"] == wanted)


def state(client: Client, node: str) -> str | None:
    return next((n["state"] for n in client.get_json("/nodes") if n["name"] == node), None)


# -- the extra hop ----------------------------------------------------------------------------

@contextlib.contextmanager
def host_node(directory: Path) -> Iterator[tuple[str, int]]:
    """``ufaas node`` as a process of this machine, on its engine (the fronts' own): the
    hop alone, without the lab's nested engines. Yields its URL and pid."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    labels = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in LABELS.items())
    config = directory / "hop-node.toml"
    config.write_text(f'labels = {{ {labels} }}\n[cluster]\nname = "{HOST_NODE}"\n'
                      f'listen = "127.0.0.1"\nnode_port = {port}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("UFAAS_")}
    with open(directory / "hop-node.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ufaas.cli", "node", "--config",
                                 str(config)], cwd=ROOT, env={**env, **NODE_ENV},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"ufaas node exited: {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1):
                return True
            return False
        wait_until("ufaas node on this machine listening", listening)
        yield f"ws://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def hop(lab: Any, directory: Path, n: int) -> tuple[dict[str, Row], dict[str, float]]:
    """``echo hi`` one at a time, alternating in blocks: through a front to its own engine
    (the host's), through another to ``ufaas node`` on that same engine (the hop alone),
    and through a third to ``ufaas node`` on lab node 1 (the hop and a nested engine).
    Also the CPU each call costs the first two fronts and that node: on two cores a call's
    processes run one after the other, so what the node and the front's remote path
    spend is most of the hop."""
    local = write_config(directory, "hop-local", None, min_idle=1, pool_max=2)
    remote = write_config(directory, "hop-remote", [lab.node_url(1)], min_idle=1, pool_max=2)
    with host_node(directory) as (url, node_pid):
        same = write_config(directory, "hop-same", [url], min_idle=1, pool_max=2)
        with front(local) as (own, here), front(same) as (via, near), \
                front(remote) as (_, there):
            wait_until("the local pool warm", lambda: warm(here, None))
            wait_until("the same engine's node warm", lambda: warm(near, HOST_NODE))
            wait_until("the remote pool warm", lambda: warm(there, lab.name(1)))
            rows = {"local": Row("front -> its own engine"),
                    "same": Row("front -> ufaas node -> that engine"),
                    "remote": Row("front -> ufaas node -> lab node 1")}
            body = function_body(PYTHON_IMAGE)
            pids = {"local": own.pid, "same": via.pid, "node": node_pid}
            before = {k: process_cpu_s(pid) for k, pid in pids.items()}
            interleaved([(rows[k], HttpSeries(c, k, body).once)
                         for k, c in (("local", here), ("same", near), ("remote", there))], n)
            calls = len(rows["same"].samples_ms) + WARMUP  # and interleaved's warm-up
            cpu = {k: (process_cpu_s(pid) - before[k]) * 1000 / calls
                   for k, pid in pids.items()}
    return rows, cpu


def engines(lab: Any, n: int) -> dict[str, float]:
    """The agent's raw round trip (bench.floors) on this machine's engine and on lab node
    1's: what the nested engine alone adds to a call there; and the link's round trip
    alone (bench.floors), the floor of the hop's two messages."""
    found = {}
    for name, client in (("host", docker.from_env()),
                         ("lab", docker.DockerClient(base_url=lab.engine(1)))):
        found[name] = statistics.median(agent_floor(client, n).samples_ms)
        client.close()
    for kind in ("websocket", "tcp"):
        found[f"link_{kind}"] = statistics.median(link_floor(n, kind).samples_ms)
    return found


# -- throughput -------------------------------------------------------------------------------

def throughput(lab: Any, directory: Path, per_level: int) -> list[dict[str, Any]]:
    out = []
    for k in range(0, lab.nodes + 1):  # 0: the front's own engine, for comparison
        nodes = [lab.node_url(i) for i in range(1, k + 1)] if k else None
        config = write_config(directory, f"tp-{k}", nodes, min_idle=2, pool_max=4)
        with front(config) as (server, client):
            for i in range(1, k + 1):
                wait_until(f"node {i} warm", warm, client, lab.name(i), 2)
            if not k:
                wait_until("own engine warm", warm, client, None, 2)
            level = run_batch(server.url, CONCURRENCY, per_level, function_body(PYTHON_IMAGE),
                              server)
            used = {r["node"] for r in client.get_json(f"/fn?status=all&limit={per_level}")}
        out.append({"nodes": k, "per_s": level.per_s, "errors": len(level.errors),
                    "p50_ms": statistics.median(level.latencies_ms or [float("nan")]),
                    "front_cpu_ms": level.cpu_ms.get("server"), "used": len(used - {None})})
    return out


# -- a node joining ---------------------------------------------------------------------------

def joining(lab: Any, directory: Path, times: int) -> list[dict[str, float]]:
    """Node 3's ``ufaas node`` started while a front with a configured pool runs: the
    time until the front has it ready, then until it has a warm container there."""
    config = write_config(directory, "join", [lab.node_url(i) for i in range(1, 4)],
                          min_idle=1, pool_max=2)
    name = lab.name(3)
    out = []
    with front(config) as (_, client):
        for _ in range(times):
            lab.docker(3, "stop", "-t", "10", lab_module.NODE_CONTAINER)
            wait_until("node 3 gone", lambda: state(client, name) != "ready")
            wait_until("nodes 1, 2 warm", lambda: warm(client, lab.name(1))
                       and warm(client, lab.name(2)))
            time.sleep(2 * HEARTBEAT)
            began = time.perf_counter()
            lab.docker(3, "start", lab_module.NODE_CONTAINER)
            started = time.perf_counter()
            ready = wait_until("node 3 ready", lambda: state(client, name) == "ready")
            hot = wait_until("node 3 warm", lambda: warm(client, name))
            out.append({"start_ms": (started - began) * 1000, "ready_ms": (ready - began) * 1000,
                        "warm_ms": (hot - began) * 1000})
    return out


# -- faults -------------------------------------------------------------------------------------

FAULTS: dict[str, tuple[str, str]] = {
    "power cut (docker kill)": ("kill", "start"),
    "engine killed (kill -9 dockerd)": ("kill_engine", "wait_engine"),
    "hung (docker pause)": ("pause", "unpause"),
    "partitioned (network disconnect)": ("disconnect", "connect"),
}


def faults(lab: Any, directory: Path) -> list[dict[str, Any]]:
    """A long function running on every node, then a fault of node 3: the time from the
    fault until its function's record says ``error``, and what it says."""
    config = write_config(directory, "faults", [lab.node_url(i) for i in range(1, 4)],
                          min_idle=1, pool_max=1)
    sleep = json.dumps({"image": PYTHON_IMAGE, "command": ["sleep", "300"]}).encode()
    out = []
    with front(config) as (_, client):
        for fault, (cause, undo) in FAULTS.items():
            for i in range(1, 4):
                wait_until(f"node {i} warm", warm, client, lab.name(i))
            ids = [outcome(*client.request("POST", "/fn", sleep))[0]["id"] for _ in range(3)]
            wait_until("all running", lambda: all(
                client.get_json(f"/fn/{i}")["status"] == "running" for i in ids))  # noqa: B023
            victim = next(i for i in ids if client.get_json(f"/fn/{i}")["node"] == lab.name(3))
            began = time.perf_counter()
            getattr(lab, cause)(3)
            caused = time.perf_counter()
            ended = wait_until("the error", status_is, client, victim, "error", timeout=60)
            record = client.get_json(f"/fn/{victim}")
            for i in ids:
                if i != victim:
                    client.request("DELETE", f"/fn/{i}")
            getattr(lab, undo)(3)
            lab.heal()
            lab.wait_node(3)
            wait_until("node 3 back", lambda: state(client, lab.name(3)) == "ready")
            out.append({"fault": fault, "cause_ms": (caused - began) * 1000,
                        "error_ms": (ended - began) * 1000, "error": record["error"]})
    return out


# -- the report ---------------------------------------------------------------------------------

def report(rows: dict[str, Row], cpu: dict[str, float], floors: dict[str, float],
           levels: list[dict[str, Any]], joins: list[dict[str, float]],
           ends: list[dict[str, Any]]) -> dict[str, Any]:
    p = _percentile
    print(f"{'warm echo hi, one at a time':<40} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'fail':>4}")
    for row in rows.values():
        print(f"{row.name:<40} {len(row.samples_ms):>4} {statistics.median(row.samples_ms):>8.2f}"
              f" {p(row.samples_ms, 99):>8.2f} {len(row.failures):>4}")
    p50 = {k: statistics.median(r.samples_ms) for k, r in rows.items()}
    extra = p50["same"] - p50["local"]
    print(f"the extra hop (a node on the same engine): {extra:+.2f} ms p50 "
          f"(target <= 1.5 ms: {'met' if extra <= 1.5 else 'MISSED'})")
    nested = floors["lab"] - floors["host"]
    print(f"to lab node 1: {p50['remote'] - p50['local']:+.2f} ms p50, of which its nested "
          f"engine: {nested:+.2f} ms (the agent's raw round trip there {floors['lab']:.2f} "
          f"ms, here {floors['host']:.2f} ms)")
    print(f"the link alone, a run out and a result back between two processes: "
          f"{floors['link_websocket']:.2f} ms p50 on trio-websocket "
          f"({floors['link_tcp']:.2f} ms on a bare trio TCP stream)")
    print(f"CPU per call: the front {cpu['local']:.2f} ms to its own engine, "
          f"{cpu['same']:.2f} ms through the node; the node {cpu['node']:.2f} ms\n")
    found = {"hop": hop_of(rows), "extra_hop_p50_ms": extra, "engine_floors_ms": floors,
             "cpu_ms_per_call": cpu}
    if not levels:
        return found
    print(f"{'nodes':>5} {'functions/s':>12} {'p50 ms':>8} {'front CPU ms/fn':>16} "
          f"{'nodes used':>10} {'errors':>6}   (concurrency {CONCURRENCY})")
    for lv in levels:
        print(f"{lv['nodes'] or 'own':>5} {lv['per_s']:>12.0f} {lv['p50_ms']:>8.1f} "
              f"{lv['front_cpu_ms'] or float('nan'):>16.2f} {lv['used']:>10} {lv['errors']:>6}")
    print()
    print(f"{'node joins: ms after docker start':<34} {'started':>8} {'ready':>6} "
          f"{'warm':>6} {'ready->warm':>11}")
    for j in joins:
        print(f"{'':<34} {j['start_ms']:>8.0f} {j['ready_ms']:>6.0f} {j['warm_ms']:>6.0f} "
              f"{j['warm_ms'] - j['ready_ms']:>11.0f}")
    print()
    print(f"{'fault of a node mid-run':<34} {'ms to error':>11}  what the record says")
    for e in ends:
        print(f"{e['fault']:<34} {e['error_ms']:>11.0f}  {e['error'].split(' (')[0][:70]}")
    print(f"(heartbeat {HEARTBEAT:g} s, node_timeout {NODE_TIMEOUT:g} s: the stated deadline "
          f"is node_timeout + one heartbeat)")
    return {**found, "throughput": levels,
            "joins": joins, "faults": ends, "lab_nodes": 3, "concurrency": CONCURRENCY}


def hop_of(rows: dict[str, Row]) -> dict[str, Any]:
    return {k: {"p50_ms": statistics.median(r.samples_ms),
                "p99_ms": _percentile(r.samples_ms, 99), "n": len(r.samples_ms),
                "failures": r.failures[:5]} for k, r in rows.items()}


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(int(q / 100 * len(ordered) + 0.999999) - 1, 0)]


lab_module: Any = None


def main(argv: list[str] | None = None) -> int:
    global lab_module
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--json", type=Path, help=f"default {DEFAULT_JSON.name} in "
                        f"{DEFAULT_JSON.parent}, cluster-hop.json with --only hop")
    parser.add_argument("--n", type=int, default=N_HOP, help="timed calls per hop row")
    parser.add_argument("--per-level", type=int, default=PER_LEVEL)
    parser.add_argument("--joins", type=int, default=JOINS)
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    parser.add_argument("--only", choices=("hop",), help="run that section alone")
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = DEFAULT_JSON.with_stem(f"cluster-{args.only}") if args.only else DEFAULT_JSON
    lab_module = load_lab()
    lab = lab_module.Lab(3)
    docker_client = docker.from_env()
    try:
        lab_module.build_node_image()
        app = lab_module.app_image()
        lab.up((BUSYBOX_IMAGE, PYTHON_IMAGE, app))
        for n in range(1, lab.nodes + 1):  # this bench's settings, not a test's
            lab.docker(n, "rm", "-f", lab_module.NODE_CONTAINER, check=False)
        lab.serve_nodes(app, NODE_ENV)
        with tempfile.TemporaryDirectory(prefix="ufaas-bench-cluster-") as tmp:
            directory = Path(tmp)
            rows, cpu = hop(lab, directory, args.n)
            floors = engines(lab, args.n)
            levels, joins, ends = [], [], []
            if args.only is None:
                levels = throughput(lab, directory, args.per_level)
                joins = joining(lab, directory, args.joins)
                ends = faults(lab, directory)
        result = report(rows, cpu, floors, levels, joins, ends)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        remove_leftovers(docker_client)
        if not args.keep:
            lab.down()
    failed = sum(len(r.failures) for r in rows.values()) + sum(lv["errors"] for lv in levels)
    return 1 if failed or result["extra_hop_p50_ms"] > 1.5 else 0


if __name__ == "__main__":
    sys.exit(main())
