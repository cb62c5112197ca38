"""Row 3 of two checkouts side by side: is a change faster or slower than the tree before it?

``python -m bench.ab --base PATH`` starts one ufaas server from this tree and one from the
checkout at PATH (say, ``git worktree add ../base HEAD~1``), then times row 3 (``POST
/fn?wait``, ``echo hi`` through the agent) against both in alternating blocks, so that
both meet the same machine, and the two floors of row 3 (bench.floors) in the same run.
It prints each tree's p50, its CPU per function and its share over the floor, the
difference of the two p50s (what a change costs row 3: /metrics' target is +0.1 ms at
most), and what a ``GET /metrics`` scrape of this tree takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import docker

from ._common import (
    EXPECTED,
    PYTHON_IMAGE,
    WARMUP,
    Row,
    interleaved,
    percentile,
    remove_leftovers,
    timed,
)
from .floors import agent_floor, http_floor
from .run import (
    BUSYBOX_IMAGE,
    CPU_PARTS,
    ROOT,
    HttpSeries,
    Server,
    cpu_snapshot,
    function_body,
    start,
    wait_settled,
    write_config,
)

SCRAPES = 50


def scrape(url: str) -> tuple[bytes, str]:
    """One ``GET /metrics`` (an error raises: ``timed`` is told it went well)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        answer.read()
    return EXPECTED, ""


def measure(trees: dict[str, Path], n: int, block: int) -> None:
    body = function_body(PYTHON_IMAGE)
    servers, series, rows, cpu = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="ufaas-ab-") as tmp:
        try:
            for name, tree in trees.items():
                directory = Path(tmp) / name
                directory.mkdir()
                server = servers[name] = Server(
                    write_config(directory, PYTHON_IMAGE, BUSYBOX_IMAGE, plain=True),
                    tree=tree)
                client, _ = start(server, pools=2)
                wait_settled(client)
                series[name] = HttpSeries(client, name, body)
                rows[name] = Row(f"{name}: row 3")
            before = {name: cpu_snapshot(s) for name, s in servers.items()}
            interleaved([(rows[name], series[name].once) for name in trees], n, block)
            for name, server in servers.items():
                after = cpu_snapshot(server)
                done = len(rows[name].samples_ms) + WARMUP  # and the warm-up
                cpu[name] = {k: (after[k] - before[name][k]) * 1000 / done
                             for k in CPU_PARTS}
            scrapes = Row("GET /metrics")
            timed(scrapes, SCRAPES, lambda: scrape(servers["this"].url))
            floor_http = http_floor(n // 4, body)
            floor_agent = agent_floor(docker.from_env(), n // 4)
        finally:
            for server in servers.values():
                server.stop()
            remove_leftovers(docker.from_env())
    floor = statistics.median(floor_http.samples_ms) + statistics.median(floor_agent.samples_ms)
    print(f"{'tree':8} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8} "
          f"{'server CPU ms/fn':>17} {'over floor':>11}")
    for name in trees:
        samples = rows[name].samples_ms
        p50 = statistics.median(samples)
        print(f"{name:8} {len(samples):5d} {p50:8.2f} {percentile(samples, 90):8.2f} "
              f"{statistics.fmean(samples):8.2f} {cpu[name]['server']:17.2f} "
              f"{p50 - floor:11.2f}")
        if rows[name].failures:
            print(f"  {len(rows[name].failures)} failures, first: {rows[name].failures[0]}")
    if "base" in rows:
        delta = statistics.median(rows["this"].samples_ms) - statistics.median(
            rows["base"].samples_ms)
        print(f"this - base: {delta:+.2f} ms p50 (the target of /metrics' cost on row 3: "
              "<= +0.10 ms)")
    print(f"a /metrics scrape of this tree: p50 {statistics.median(scrapes.samples_ms):.2f} "
          f"ms over {len(scrapes.samples_ms)} scrapes")
    print(f"floor of row 3: bare hypercorn {statistics.median(floor_http.samples_ms):.2f} ms "
          f"+ agent round trip {statistics.median(floor_agent.samples_ms):.2f} ms = "
          f"{floor:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--base", type=Path, required=True,
                        help="the other checkout (its ufaas runs as 'base')")
    parser.add_argument("-n", type=int, default=2000, help="timed requests per tree")
    parser.add_argument("--block", type=int, default=50, help="requests per block")
    args = parser.parse_args(argv)
    if not (args.base / "ufaas" / "__init__.py").exists():
        parser.error(f"{args.base} is not a ufaas checkout")
    measure({"this": ROOT, "base": args.base.resolve()}, args.n, args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
