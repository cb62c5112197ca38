"""What one trivial function (``echo hi``) costs on each path, and how fast a pool refills.

Run from the repository root: ``python -m bench.pool [--n N] [--json PATH]``. Needs a Docker
engine and the test images (``python tests/images.py``); removes every container it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import docker
import trio

from pool import Engine, Job, Place, Pool

from ._common import (
    ARGV,
    BUSYBOX_IMAGE,
    DOCKER_TIMEOUT,
    LABELS,
    PYTHON_IMAGE,
    WARMUP,
    Refill,
    Row,
    docker_run_row,
    exec_run_row,
    host_row,
    load_average,
    remove_leftovers,
    summary,
)

MIN_IDLE = 2
DEFAULT_N = 200
REFILLS = 5
REFILL_TIMEOUT = 30.0

AGENT_ROW = "pool lease+run (agent)"


# -- rows measured through the pool ---------------------------------------------------------

@asynccontextmanager
async def serving(engine: Engine, image: str, mode: str) -> AsyncIterator[Pool]:
    """A warm pool of ``image`` for the length of the block; its containers go with it."""
    async with trio.open_nursery() as nursery:
        pool = Pool(engine, image, min_idle=MIN_IDLE, max=4, labels=LABELS)
        await nursery.start(pool.serve)
        await pool.wait_warm()
        if pool.mode != mode:
            raise RuntimeError(f"pool of {image} runs by {pool.mode!r}, not {mode!r}")
        yield pool
        nursery.cancel_scope.cancel()


async def pool_row(pool: Pool, name: str, n: int, *, locality: bool = False) -> Row:
    row = Row(name)
    place: Place | None = None
    for i in range(-WARMUP, n):
        if i == 0:
            # The warm-up leases made the pool start a spare container (a lease leaves fewer
            # than min_idle idle); let that start finish rather than time runs against it.
            await pool.wait_warm(pool.statistics().total)
        start = time.perf_counter()
        async with pool.lease(near=place if locality else None) as lease:
            result = await lease.run(Job(ARGV, timeout=10.0))
        elapsed = (time.perf_counter() - start) * 1000
        place = result.place
        if i >= 0:
            row.samples_ms.append(elapsed)
            if result.duration_ms is not None:
                row.inside_ms.append(result.duration_ms)
            why = "" if result.outcome == "exited" and result.exit_code == 0 else (
                f"{result.outcome} exit={result.exit_code} error={result.error}")
            if locality and not lease.hit:
                why += " (locality missed)"
            row.check(i, result.stdout, why)
    return row


async def refill_once(pool: Pool, client: docker.DockerClient) -> Refill:
    """Force-remove one idle container behind the pool's back; time its replacement.

    Run it before any lease: a lease briefly leaves fewer than min_idle idle, so the pool
    grows past min_idle, and removing a surplus container would need no refill at all.
    """
    stats = pool.statistics()
    if (stats.idle, stats.total) != (MIN_IDLE, MIN_IDLE):
        raise RuntimeError(f"pool is not at rest with {MIN_IDLE} idle: {stats}")
    found = await pool.engine.containers({"ufaas.instance": pool.instance})
    idle = [c.id for c in found if (pc := pool.container(c.id)) is not None
            and pc.state == "idle"]
    if not idle:
        raise RuntimeError("no idle container to remove")
    # The pool notices a lost container on its watch tick: without a random offset, removals
    # that follow one another lock onto the tick's phase and always wait the same time.
    await trio.sleep(random.uniform(0, pool.watch_interval))
    with trio.fail_after(REFILL_TIMEOUT):
        start = time.perf_counter()
        await trio.to_thread.run_sync(
            lambda: client.containers.get(idle[0]).remove(force=True))
        removed = time.perf_counter()
        # The pool has no event for "a container was lost": poll, at a fine grain.
        while pool.statistics().idle >= MIN_IDLE:  # noqa: ASYNC110
            await trio.sleep(0.002)
        noticed = time.perf_counter()
        await pool.wait_warm(timeout=REFILL_TIMEOUT)
        refilled = time.perf_counter()
    return Refill(*((t - start) * 1000 for t in (removed, noticed, refilled)))


async def pool_rows(client: docker.DockerClient, n: int, python_image: str,
                    busybox_image: str) -> tuple[list[Row], list[Refill]]:
    engine = Engine()
    try:
        async with serving(engine, python_image, "agent") as pool:
            refills = [await refill_once(pool, client) for _ in range(REFILLS)]
            agent = await pool_row(pool, AGENT_ROW, n)
            near = await pool_row(pool, "pool locality follow-up", n, locality=True)
        async with serving(engine, busybox_image, "exec") as pool:
            fallback = await pool_row(pool, "pool lease+run (exec fallback)", n)
    finally:
        with trio.CancelScope(shield=True):
            await engine.aclose()
    return [agent, fallback, near], refills


# -- the run ---------------------------------------------------------------------------------

def print_table(summaries: list[dict[str, object]]) -> None:
    head = f"{'row':<32} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'vs agent':>9}"
    print(head)
    print("-" * len(head))
    for s in summaries:
        ratio = float(s["ratio"])  # type: ignore[arg-type]
        print(f"{s['row']:<32} {s['n']:>5} {s['p50_ms']:>9.2f} {s['p99_ms']:>9.2f} "
              f"{s['mean_ms']:>9.2f} {ratio:>8.{2 if ratio < 10 else 0}f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__)
    parser.add_argument("--n", type=int, default=DEFAULT_N,
                        help="timed runs per fast row (default %(default)s)")
    parser.add_argument("--n-run", type=int, default=None,
                        help="timed runs of `docker run` (default: N/10, at least 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--python-image", default=PYTHON_IMAGE)
    parser.add_argument("--busybox-image", default=BUSYBOX_IMAGE)
    args = parser.parse_args(argv)
    n, n_run = args.n, args.n_run or max(args.n // 10, 1)

    began = time.perf_counter()
    load_before = load_average()
    client = docker.from_env(timeout=DOCKER_TIMEOUT)
    interrupted = False
    try:
        host = host_row(n)
        run = docker_run_row(client, args.python_image, n_run)
        exec_run = exec_run_row(client, args.python_image, n)
        (agent, fallback, near), refills = trio.run(
            pool_rows, client, n, args.python_image, args.busybox_image)
    except* KeyboardInterrupt:
        interrupted = True
    finally:
        left = remove_leftovers(client)
        client.close()
    if left:
        print(f"warning: {left} container(s) were still there at the end; removed them",
              file=sys.stderr)
    if interrupted:
        print("interrupted", file=sys.stderr)
        return 130

    rows = [run, exec_run, agent, fallback, near, host]
    base = statistics.median(agent.samples_ms)
    summaries = [summary(r, base) for r in rows]
    print_table(summaries)
    print()
    for r in (agent, fallback, near):
        if r.inside_ms:
            print(f"{r.name}: the command itself ran {statistics.median(r.inside_ms):.2f} ms "
                  "(p50 of Result.duration_ms)")
    refill_ms = statistics.median(r.refilled_ms for r in refills)
    print(f"refill to min_idle={MIN_IDLE} after a force-remove (python pool), median of "
          f"{len(refills)}: {refill_ms:.0f} ms; noticed after a median "
          f"{statistics.median(r.noticed_ms for r in refills):.0f} ms (the pool's watch tick), "
          f"then started one in a median "
          f"{statistics.median(r.refilled_ms - r.noticed_ms for r in refills):.0f} ms")
    print("  samples (remove call / noticed / refilled, ms): " + ", ".join(
        f"{r.remove_ms:.0f}/{r.noticed_ms:.0f}/{r.refilled_ms:.0f}" for r in refills))
    failures = [(r.name, f) for r in rows for f in r.failures]
    print(f"\nfailures: {len(failures) or 'none'}")
    for name, f in failures:
        print(f"  {name}: {f}")
    total = time.perf_counter() - began
    load = (load_before, load_average())
    print(f"\ntotal {total:.1f} s; 1-min load average {load[0]:.2f} at start, {load[1]:.2f} at end "
          f"on {os.cpu_count()} CPUs (other work on the machine skews every row)")

    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "argv": ARGV, "rows": summaries, "refill_ms": refill_ms,
                "refills": [asdict(r) for r in refills],
                "samples_ms": {r.name: r.samples_ms for r in rows},
                "failures": {r.name: r.failures for r in rows if r.failures},
                "inside_ms": {r.name: r.inside_ms for r in rows if r.inside_ms},
                "total_s": total, "load_average": load, "cpus": os.cpu_count(),
            }, out, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
