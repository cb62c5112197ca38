"""The ufaas server (``ufaas.cli``) under pyinstrument, profiling from SIGUSR1 to SIGUSR2.

``python -m bench._profiled BASE -- [ufaas options]`` writes BASE.txt (call tree),
BASE.flat.txt (functions by self time), BASE.html and BASE.pyisession (for
``pyinstrument --load``) on exit; ``python -m bench --profile``
runs it. The profiler samples only the main thread: the event loop, where requests are
handled (the Docker SDK's worker threads do not show).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

from pyinstrument import Profiler

from ufaas.cli import main as ufaas_main

INTERVAL = 0.0005


def main(argv: list[str]) -> int:
    base, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    profiler = Profiler(interval=INTERVAL, async_mode="disabled")

    def on(signum: int, frame: FrameType | None) -> None:
        if not profiler.is_running:
            profiler.start()

    def off(signum: int, frame: FrameType | None) -> None:
        if profiler.is_running:
            profiler.stop()

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    try:
        return ufaas_main(rest)
    finally:
        off(0, None)
        if profiler.last_session is not None:
            Path(f"{base}.txt").write_text(profiler.output_text(show_all=False))
            Path(f"{base}.flat.txt").write_text(profiler.output_text(flat=True))
            Path(f"{base}.html").write_text(profiler.output_html())
            profiler.last_session.save(f"{base}.pyisession")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
