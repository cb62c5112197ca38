"""Specs from JSON without holding the event loop.

A body up to ``INLINE_BYTES`` is decoded and validated in place: whatever its shape, that
takes a few milliseconds. A bigger one goes to a worker process, one at a time: a single
C call of the JSON decoder over megabytes would otherwise hold the GIL, and every other
request, for as long as it takes, and a body built to blow up (millions of keys) would
grow the server. The worker has its own memory limit and a deadline per body; what it
sends back is the validated spec, pickled.
"""

from __future__ import annotations

import json
import logging
import pickle
import resource
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import trio

from pool import MiB

from .spec import BadJSON, Spec, SpecError, decode, merge, parse_spec

log = logging.getLogger("ufaas")

INLINE_BYTES = 64 * 1024
WORKER_MEMORY = 1024 * MiB  # address space of the worker: a body that needs more is refused
PARSE_TIMEOUT = 30.0
START_TIMEOUT = 30.0
_LENGTH = struct.Struct(">Q")
# The settings Config.limits() reads: all a worker is told of the configuration.
LIMIT_SETTINGS = {"max_timeout", "default_timeout", "max_resources", "max_file_bytes",
                  "max_total_bytes", "fetch_allow"}


@dataclass
class Parsed:
    """A validated spec, its JSON to keep (as sent; for PUT, merged), and for a spec that
    came inside a message, the rest of that message."""

    spec: Spec | None  # None: a message with no spec in it
    json: bytes
    envelope: Any = None


def parse_inline(raw: bytes | None, data: Any, limits: Any, image: str | None,
                 update: bytes | None = None, inside: str | None = None) -> Parsed:
    """Decode ``raw`` (or take ``data``); with ``inside``, the spec is that field of it.
    Give the spec ``image`` when it names none, merge ``update`` (a PUT body) into it when
    given, and validate it; raise BadJSON or SpecError."""
    as_sent = raw if inside is None and update is None and image is None else None
    if raw is not None:
        data = decode(raw)
    envelope = None
    if inside is not None:
        if not isinstance(data, dict) or inside not in data:
            return Parsed(None, b"", data)  # no spec in it: the message is all there is
        envelope = {k: v for k, v in data.items() if k != inside}
        data = data[inside]
    if isinstance(data, dict) and "image" not in data and image is not None:
        data = {**data, "image": image}
    if update is not None:
        spec, data = merge(data, decode(update), limits)
    else:
        spec = parse_spec(data, limits)
    return Parsed(spec, as_sent if as_sent is not None else json.dumps(data).encode(),
                  envelope)


class Parser:
    """Validates specs for one server; run ``serve`` in its nursery (it owns the worker)."""

    def __init__(self, config: Any, *, inline_bytes: int = INLINE_BYTES,
                 worker_memory: int = WORKER_MEMORY, timeout: float = PARSE_TIMEOUT) -> None:
        self.config = config
        self.limits = config.limits()
        self.inline_bytes = inline_bytes
        self.worker_memory = worker_memory
        self.timeout = timeout
        self._lock = trio.Lock()
        self._process: trio.Process | None = None
        self._buffer = bytearray()
        self.worker_starts = 0

    async def serve(self, *, task_status: trio.TaskStatus[Parser] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()

    def is_small(self, raw: bytes | str) -> bool:
        return len(raw) <= self.inline_bytes

    async def parse(self, raw: bytes | None = None, data: Any = None, *,
                    image: str | None = None, update: bytes | None = None,
                    inside: str | None = None) -> Parsed:
        """The validated spec of ``raw`` (JSON) or ``data`` (decoded already, and small),
        with ``update`` (the JSON of a PUT) merged in when given; with ``inside``, the spec
        is that field of ``raw``. ``image`` is the spec's when it names none. Raise
        BadJSON or SpecError. On cancellation a worker busy with the body is killed.
        """
        size = len(raw or b"") + len(update or b"")
        if raw is None or size <= self.inline_bytes:
            return parse_inline(raw, data, self.limits, image, update, inside)
        async with self._lock:
            return await self._in_worker(raw, (image, update, inside))

    # -- the worker -----------------------------------------------------------------------

    async def _in_worker(self, raw: bytes, options: tuple[Any, ...]) -> Parsed:
        request = pickle.dumps(options, protocol=5)
        try:
            with trio.fail_after(self.timeout):
                process = await self._worker()
                assert process.stdin is not None
                await process.stdin.send_all(_LENGTH.pack(len(raw)) + raw
                                             + _LENGTH.pack(len(request)) + request)
                answer = await self._receive(process)
        except trio.TooSlowError:
            await self._stop()
            raise SpecError([{"field": "spec", "message": "validation took longer than "
                              f"{self.timeout:g} s"}]) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            # It died on this body (out of its memory, say): next time, a new one.
            await self._stop()
            raise SpecError([{"field": "spec", "message": "too complex to validate within "
                              f"{self.worker_memory // MiB} MiB"}]) from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop()  # cancelled half-way: its next answer would be this one's
            raise
        kind, value = answer
        if kind == "ok":
            spec, kept, envelope = value
            return Parsed(spec, raw if kept is None else kept, envelope)
        if kind == "json":
            raise BadJSON(value)
        if kind == "spec":
            errors, more = value
            raise SpecError(errors, more=more)
        raise SpecError([{"field": "spec", "message": str(value)}])

    async def _worker(self) -> trio.Process:
        if self._process is None or self._process.returncode is not None:
            self._buffer = bytearray()
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ufaas.parser", str(self.worker_memory)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.worker_starts += 1
            assert self._process.stdin is not None
            # What limits() needs, and nothing else (the token, say).
            config = self.config.model_dump_json(include=LIMIT_SETTINGS).encode()
            await self._process.stdin.send_all(_LENGTH.pack(len(config)) + config)
        return self._process

    async def _receive(self, process: trio.Process) -> Any:
        assert process.stdout is not None
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(self._buffer)
                end = _LENGTH.size + size
                if len(self._buffer) >= end:
                    with memoryview(self._buffer) as view:  # no copy of megabytes
                        answer = pickle.loads(view[_LENGTH.size:end])
                    del self._buffer[:end]
                    return answer
            chunk = await process.stdout.receive_some(1 << 20)
            if not chunk:
                raise EOFError("the parse worker ended")
            self._buffer += chunk

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with trio.move_on_after(5):
                process.kill()
                await process.wait()


def _read(stream: Any) -> bytes:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _answer(stream: Any, value: Any) -> None:
    data = pickle.dumps(value, protocol=5)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def worker(memory: int) -> None:
    """The worker's loop: a config, then (body, (image, update)) pairs, each answered."""
    from .config import Config

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    limits = Config.model_validate_json(_read(stdin)).limits()
    while True:
        try:
            raw = _read(stdin)
            image, update, inside = pickle.loads(_read(stdin))
        except EOFError:
            return
        try:
            parsed = parse_inline(raw, None, limits, image, update, inside)
            # The JSON as sent is what the server sent us: not worth sending back.
            kept = None if parsed.json is raw else parsed.json
            answer: tuple[str, Any] = ("ok", (parsed.spec, kept, parsed.envelope))
        except BadJSON as exc:
            answer = ("json", str(exc))
        except SpecError as exc:
            answer = ("spec", (exc.problems, exc.more))
        except MemoryError:
            answer = ("error", f"too complex to validate within {memory // MiB} MiB")
        del raw
        _answer(stdout, answer)


if __name__ == "__main__":
    worker(int(sys.argv[1]))
