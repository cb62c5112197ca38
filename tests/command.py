"""The ``ufaas`` command as the tests run it: the console script installed beside this
interpreter when there is one (running it proves the entry point), else ``python -m``;
and a server started with it, as a process of its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import trio


def ufaas_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "ufaas")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "ufaas.cli"]


READY = re.compile(r"ufaas ready at (http://\S+)")


class Server:
    """`ufaas` started as a subprocess, its log in a file."""

    def __init__(self, tmp_path, name, args, env=None):
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*ufaas_command(), *args], stdout=self.log, stderr=self.log,
            env={**os.environ, **(env or {})})
        self.url = None

    async def ready(self, timeout=30):
        with trio.fail_after(timeout):
            while True:
                text = self.log_path.read_text()
                if (m := READY.search(text)) is not None:
                    self.url = m.group(1)
                    return self.url
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited {self.proc.returncode}: {text}")
                await trio.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.log.close()
        return self.proc.returncode

    def rss(self) -> int:
        """Its resident memory, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
