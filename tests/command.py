"""The ``ufaas`` command as the tests run it: the console script installed beside this
interpreter when there is one (running it proves the entry point), else ``python -m``;
and a server started with it, as a process of its own; or the server in a thread of
the tests' process, for a module to share."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading

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


# Seconds a threaded server may take to start or to stop.
START_CAP = 60


class ThreadedServer:
    """The real server in a thread with its own ``trio.run``: for sync tests (hypothesis),
    and for a server that outlives one test's ``trio.run`` (module-scoped)."""

    def __init__(self, config, *, instance, labels):
        self._args = (config, instance, labels)
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self):
        from ufaas.server import serve

        config, instance, labels = self._args
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(functools.partial(
                    serve, config, shutdown_trigger=stop.wait, instance=instance,
                    labels=labels))
                self._ready.put((url, trio.lowlevel.current_trio_token(), stop))
        except BaseException as exc:
            self._ready.put(exc)
            raise

    def __enter__(self):
        self._thread.start()
        got = self._ready.get(timeout=START_CAP)
        if isinstance(got, BaseException):
            raise got
        self.url, self._token, self._stop = got
        return self

    def __exit__(self, *exc_info):
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(START_CAP)
        assert not self._thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def module_server(name, tmp_path_factory, labels, **settings):
    """The real server in a thread, on port 0 with a database of its own, for a whole test
    module to share; its URL. ``labels``: the module's (the ``module_labels`` fixture)."""
    from ufaas.config import Config

    config = Config.load(None, environ={}, port=0,
                         db=str(tmp_path_factory.mktemp(name) / "ufaas.db"), **settings)
    with ThreadedServer(config, instance=f"{labels['ufaas.test']}-{name}",
                        labels=labels) as running:
        yield running.url
