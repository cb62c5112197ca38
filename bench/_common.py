"""What the benches share: the trivial function, sample rows and their statistics, and the
rows that go around ufaas (``docker run``, ``exec_run``, a host process) to compare with.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import docker

PYTHON_IMAGE = "ufaas-test/python"
BUSYBOX_IMAGE = "ufaas-test/busybox"
ARGV = ["echo", "hi"]
EXPECTED = b"hi\n"
WARMUP = 3
DOCKER_TIMEOUT = 30
# A run of a bench has its own label value, so that its final sweep cannot remove the
# containers of another bench running at the same time.
RUN_ID = uuid.uuid4().hex[:12]
LABELS = {"ufaas.bench": "1", "ufaas.bench.run": RUN_ID}


@dataclass
class Row:
    name: str
    samples_ms: list[float] = field(default_factory=list)
    # How long the command itself ran, as the container measured it (rows through ufaas).
    inside_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, i: int, stdout: bytes, why: str = "") -> None:
        if stdout != EXPECTED or why:
            self.failures.append(f"run {i}: stdout {stdout[:80]!r} {why}".rstrip())


@dataclass
class Refill:
    """One refill, in ms after the remove call began: the call returned, the pool noticed the
    loss, and the pool had its idle containers back."""

    remove_ms: float
    noticed_ms: float
    refilled_ms: float


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile: always one of the samples, never interpolated."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def timed(row: Row, n: int, once: Callable[[], tuple[bytes, str]], warmup: int = WARMUP
          ) -> Row:
    """Call ``once`` ``warmup`` times untimed, then ``n`` times timed, checking its output."""
    for i in range(-warmup, n):
        start = time.perf_counter()
        stdout, why = once()
        elapsed = (time.perf_counter() - start) * 1000
        if i >= 0:
            row.samples_ms.append(elapsed)
            row.check(i, stdout, why)
    return row


def summary(row: Row, base_p50: float) -> dict[str, object]:
    """The row's statistics; ``ratio`` is its median over ``base_p50``."""
    p50 = statistics.median(row.samples_ms)
    return {
        "row": row.name, "n": len(row.samples_ms), "p50_ms": p50,
        "p99_ms": percentile(row.samples_ms, 99), "mean_ms": statistics.fmean(row.samples_ms),
        "max_ms": max(row.samples_ms), "ratio": p50 / base_p50,
        "failures": len(row.failures),
    }


def load_average() -> float:
    return os.getloadavg()[0]


# -- rows that go around ufaas (blocking) ------------------------------------------------------

def docker_run_row(client: docker.DockerClient, image: str, n: int,
                   name: str = "docker run --rm") -> Row:
    def once() -> tuple[bytes, str]:
        return client.containers.run(image, ARGV, remove=True, labels=LABELS), ""
    # Each warm-up costs a whole container here: one is enough.
    return timed(Row(name), n, once, warmup=1)


@contextlib.contextmanager
def exec_run_once(client: docker.DockerClient, image: str
                  ) -> Iterator[Callable[[], tuple[bytes, str]]]:
    """One ``exec_run`` of the trivial function in a running container, per call."""
    container = client.containers.run(image, ["sleep", "600"], detach=True, labels=LABELS)
    try:
        def once() -> tuple[bytes, str]:
            code, output = container.exec_run(ARGV)  # not streamed: the whole output
            assert isinstance(output, bytes)
            return output, "" if code == 0 else f"exit {code}"
        yield once
    finally:
        container.remove(force=True)


def exec_run_row(client: docker.DockerClient, image: str, n: int,
                 name: str = "docker exec_run") -> Row:
    with exec_run_once(client, image) as once:
        return timed(Row(name), n, once)


def interleaved(runs: list[tuple[Row, Callable[[], tuple[bytes, str]]]], n: int,
                block: int = 5) -> None:
    """Time several rows ``n`` times each in alternating blocks, so that each meets the
    same conditions (a machine busier now than a minute ago slows all of them alike)."""
    for _, once in runs:
        timed(Row("warm-up"), 0, once)
    for i, start in enumerate(range(0, n, block)):
        for row, once in runs if i % 2 == 0 else runs[::-1]:
            timed(row, min(block, n - start), once, warmup=0)


def host_row(n: int, name: str = "host subprocess.run") -> Row:
    def once() -> tuple[bytes, str]:
        done = subprocess.run(ARGV, capture_output=True)
        return done.stdout, "" if done.returncode == 0 else f"exit {done.returncode}"
    return timed(Row(name), n, once)


def remove_leftovers(client: docker.DockerClient) -> int:
    """Remove every container this run labelled; return how many there were."""
    label = [f"{k}={v}" for k, v in LABELS.items()]
    left = client.containers.list(all=True, filters={"label": label})
    for c in left:
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
    return len(left)
