"""The messages between a front and its nodes, and nothing of their transport: one
WebSocket message is a JSON header and the binary parts it refers to.

Values are encoded generically: the pool's dataclasses (Job, Result and the ones inside
them) field by field, bytes as binary parts, so a field added to one of them travels
without a change here. Both ends must agree on those fields: :data:`SCHEMA` is their
fingerprint, checked with :data:`PROTOCOL` when a front connects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pool import File, Job, OutputFile, Outputs, Place, PoolStatistics, Profile, Result

from . import __version__

# 2: a pool's state travels as its counters alone (COUNTERS) when nothing else of it
# changed since its full view went to that front. 3: a container the front chose goes
# with the run (its pool, container and workdir in the run's header), no claim of its own.
# 4: a result carries the output that was held for it ("out": [[fd, bytes], ...]).
# 5: messages queued together go as one ("many", each a part); a release and the view of
# a pool after one wait to go with the next message (Outbox.later). 6: output held for
# a result goes the same way, several pieces in one "out" ("out": [[fd, bytes], ...]); a
# pool's view after a release goes only when it differs from what the front was told,
# a release saying whether the front counted its container idle again ("counted").
PROTOCOL = 6
_HEAD = struct.Struct(">I")
# An Outbox's batch: most bytes of messages sent as one; how long a later one may wait.
BATCH_BYTES = 256 * 1024
LATER = 0.005
# The slowest link a peer may be on and still count as taking what it is sent: a message's
# send may take the peer's timeout, and a second more for each SLOWEST_LINK bytes of it.
# (A peer that is gone is noticed apart from this, by its silence.)
SLOWEST_LINK = 1024 * 1024  # bytes a second
# Dataclasses that may travel, by name: a peer cannot make anything else.
TYPES: dict[str, type] = {cls.__name__: cls for cls in (Job, Result, File, Place, Profile,
                                                      PoolStatistics, Outputs, OutputFile)}


def schema(types: dict[str, type]) -> str:
    """A fingerprint of the fields of ``types``: ends whose dataclasses differ differ."""
    return hashlib.sha256(json.dumps(
        {name: [f.name for f in dataclasses.fields(cls)] for name, cls in sorted(types.items())}
    ).encode()).hexdigest()[:12]


SCHEMA = schema(TYPES)
# Each type's fields, looked up once (most of a message is these): see _names.
_FIELDS: dict[type, dict[str, None]] = {}
# What JSON holds as it is (a subclass, such as a str enum, goes the long way).
_PLAIN = frozenset({str, int, float, bool})
# Headers of the WebSocket handshake: the front's token and what it speaks.
TOKEN_HEADER = "authorization"
PROTOCOL_HEADER = "ufaas-protocol"
FRONT_HEADER = "ufaas-front"


# What changes with every lease and release of a pool: sent alone, in this order, when the
# rest of its view (settings, containers, errors) is what the front was last told.
COUNTERS = ("idle", "busy", "starting", "total", "waiting", "started")


class WireError(Exception):
    """A message that breaks the protocol: whoever sent it is not to be trusted further."""


def send_deadline(timeout: float, size: int) -> float:
    """How long sending a message of ``size`` bytes to a peer of ``timeout`` may take."""
    return timeout + size / SLOWEST_LINK


async def send_each(outbox: Outbox, send: Callable[[bytes], Awaitable[object]],
                    timeout: float) -> str | None:
    """Send what ``outbox`` gives, each message within its :func:`send_deadline`, until
    the outbox closes (None) or a message misses it (why, as a sentence's end). What
    ``send`` raises (the connection closed) goes to the caller."""
    while (data := await outbox.next()) is not None:
        limit = send_deadline(timeout, len(data))
        with trio.move_on_after(limit) as deadline:
            await send(data)
        if deadline.cancelled_caught:
            return f"took no message of {len(data)} bytes in {limit:.3g} s"
    return None


def speaks() -> str:
    """What this end speaks, as the handshake carries it."""
    return f"{PROTOCOL} {SCHEMA} {__version__}"


def mismatch(ours: str, theirs: str, *, we: str, they: str) -> str | None:
    """Why two ends cannot talk (None when they can), as a sentence for both logs: ``we``
    and ``they`` name the ends (``node``, ``front``)."""
    mine, other = ours.split(" "), (theirs or "?").split(" ")
    if mine[:2] == other[:2]:
        return None

    def said(parts: list[str]) -> str:
        if len(parts) != 3:
            return f"an unknown protocol ({' '.join(parts)[:60]!r})"
        return f"protocol {parts[0]} (schema {parts[1]}, ufaas {parts[2]})"
    return (f"version mismatch: the {we} speaks {said(mine)}, the {they} {said(other)}; "
            "run the same ufaas on the front and its nodes")


def pack(header: dict[str, Any], parts: list[bytes] | None = None) -> bytes:
    """One message: ``header`` (its ``parts`` entry added) and the parts after it."""
    parts = parts or []
    header["parts"] = [len(p) for p in parts]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_HEAD.pack(len(head)), head, *parts])


def messages(data: bytes | str) -> list[tuple[dict[str, Any], list[bytes]]]:
    """The messages in what a peer sent: one, or those a "many" holds (see Outbox)."""
    header, parts = unpack(data)
    if header["op"] != "many":
        return [(header, parts)]
    inner = [unpack(part) for part in parts]
    if any(h["op"] == "many" for h, _ in inner):
        raise WireError("a many inside a many")
    return inner


def unpack(message: bytes | str) -> tuple[dict[str, Any], list[bytes]]:
    """The header and parts of a message, or WireError. The message's size was capped by
    the transport; every length in it is checked against what arrived before use."""
    if not isinstance(message, bytes) or len(message) < _HEAD.size:
        raise WireError("not a binary message of this protocol")
    (size,) = _HEAD.unpack_from(message)
    if size > len(message) - _HEAD.size:
        raise WireError(f"a header of {size} bytes in a message of {len(message)}")
    try:
        header = json.loads(message[_HEAD.size:_HEAD.size + size])
    except (ValueError, RecursionError) as exc:
        raise WireError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("a header without an op")
    sizes = header.get("parts", [])
    offset = _HEAD.size + size
    if (not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 0 for n in sizes)
            or sum(sizes) != len(message) - offset):
        raise WireError("parts that do not add up to the message")
    parts = []
    for n in sizes:
        parts.append(message[offset:offset + n])
        offset += n
    return header, parts


def _names(cls: type) -> dict[str, None]:
    """The fields of dataclass ``cls``, in order (a dict, for its set operations too)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = dict.fromkeys(f.name for f in dataclasses.fields(cls))
    return names


def encode(value: Any, parts: list[bytes]) -> Any:
    """``value`` as JSON, its bytes appended to ``parts``. Tags keep every kind apart:
    ``$b`` bytes, ``$d`` a dataclass, ``$t`` a tuple, ``$m`` a dict (whose keys are then
    never mistaken for tags)."""
    kind = type(value)
    if value is None or kind in _PLAIN:
        return value
    if TYPES.get(kind.__name__) is kind:  # a dataclass of the protocol
        return {"$d": kind.__name__, "v": {name: encode(getattr(value, name), parts)
                                           for name in _names(kind)}}
    if isinstance(value, list):
        return [encode(v, parts) for v in value]
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        parts.append(bytes(value))
        return {"$b": len(parts) - 1}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        raise TypeError(f"{kind.__name__} is not a type of the protocol")
    if isinstance(value, tuple):
        return {"$t": [encode(v, parts) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("only string keys travel")
        return {"$m": {k: encode(v, parts) for k, v in value.items()}}
    raise TypeError(f"a {kind.__name__} does not travel")


def decode(value: Any, parts: list[bytes]) -> Any:
    """The inverse of :func:`encode`; WireError for anything it would not have made."""
    try:
        return _decode(value, parts)
    except RecursionError:
        raise WireError("a value nested too deep") from None


def _decode(value: Any, parts: list[bytes]) -> Any:
    if value is None or type(value) in _PLAIN:
        return value
    if type(value) is list:
        return [_decode(v, parts) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise WireError("an untagged object")
    if "$b" in value:
        index = value["$b"]
        if not isinstance(index, int) or not 0 <= index < len(parts):
            raise WireError("a reference to a part that is not there")
        return parts[index]
    if "$t" in value and isinstance(value["$t"], list):
        return tuple(_decode(v, parts) for v in value["$t"])
    if "$m" in value and isinstance(value["$m"], dict):
        return {k: _decode(v, parts) for k, v in value["$m"].items()}
    cls = TYPES.get(value.get("$d", ""))
    fields = value.get("v")
    if cls is None or not isinstance(fields, dict):
        raise WireError(f"an object of no type of the protocol ({str(value)[:60]})")
    known = _names(cls).keys()
    if not known >= fields.keys():
        raise WireError(f"{cls.__name__} fields unknown here: {sorted(fields.keys() - known)}")
    try:
        return cls(**{k: _decode(v, parts) for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        raise WireError(f"a {cls.__name__} that does not hold: {exc}") from None


def counts(stats: PoolStatistics) -> list[int]:
    """The :data:`COUNTERS` of ``stats``."""
    return [getattr(stats, name) for name in COUNTERS]


def with_counts(stats: PoolStatistics, said: object) -> PoolStatistics:
    """``stats`` with the counters a peer sent (:func:`counts`), or WireError."""
    if (not isinstance(said, list) or len(said) != len(COUNTERS)
            or not all(type(n) is int and n >= 0 for n in said)):
        raise WireError(f"counters that are not {len(COUNTERS)} counts")
    return dataclasses.replace(stats, **dict(zip(COUNTERS, said, strict=True)))


def message(op: str, fields: dict[str, Any] | None = None, **plain: Any) -> bytes:
    """A message whose ``fields`` are encoded (dataclasses, bytes...) and whose ``plain``
    keywords go in the header as they are."""
    parts: list[bytes] = []
    header: dict[str, Any] = {"op": op, **plain}
    if fields:
        header["v"] = {k: encode(v, parts) for k, v in fields.items()}
    return pack(header, parts)


def fields_of(header: dict[str, Any], parts: list[bytes]) -> dict[str, Any]:
    """The decoded ``fields`` of a message made by :func:`message`."""
    encoded = header.get("v", {})
    if not isinstance(encoded, dict):
        raise WireError("fields that are not an object")
    return {k: decode(v, parts) for k, v in encoded.items()}


class Outbox:
    """The messages to one peer, in order, for the one task that sends them (see
    :meth:`next`). What is queued by the time that task takes the next goes with it as
    one message (up to BATCH_BYTES): every message sent costs a wake-up at both ends.

    A message made :meth:`later` (a release, a pool's new counters, output held in
    case its result follows: nobody waits for them) waits to go with the next one sent,
    or LATER seconds at most. It is made when it goes, so it says what is true then, or
    nothing (None) when nothing is left to say. They go before what was queued
    (``later_last`` False: a front's releases, ahead of the claims behind them) or after
    it (True: a node's views, which say what is true after everything queued before).
    """

    def __init__(self, *, later_last: bool = False) -> None:
        self._later_last = later_last
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)
        self._later: dict[Any, Callable[[], bytes | None]] = {}
        self._due = math.inf  # when the first later message must go
        self._carried: list[bytes] = []  # taken, but over what the last batch held
        self._waiting = trio.CancelScope()

    def put(self, data: bytes) -> None:
        self._send.send_nowait(data)

    def later(self, key: Any, make: Callable[[], bytes | None]) -> None:
        """Queue ``make()`` to go with the next message; one per ``key`` (its last)."""
        self._later[key] = make
        if self._due == math.inf:
            self._due = self._waiting.deadline = trio.current_time() + LATER

    async def next(self) -> bytes | None:
        """The next WebSocket message to send; None once the outbox is closed. What an
        earlier batch had no room for goes first, then the later messages and what was
        queued, in the order the outbox was made for."""
        while True:
            waiting, self._carried = self._carried, []
            taken = None
            if not waiting:
                with trio.CancelScope(deadline=self._due) as self._waiting:
                    try:
                        taken = await self._receive.receive()
                    except trio.EndOfChannel:
                        return None
            if not self._later_last:
                waiting += self._made()
            if taken is not None:
                waiting.append(taken)
            size = sum(map(len, waiting))
            while size < BATCH_BYTES:
                try:
                    data = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                waiting.append(data)
                size += len(data)
            if self._later_last:
                waiting += self._made()
            batch: list[bytes] = []
            size = 0
            for i, data in enumerate(waiting):
                if batch and size + len(data) > BATCH_BYTES:
                    self._carried = waiting[i:]
                    break
                batch.append(data)
                size += len(data)
            if batch:
                return batch[0] if len(batch) == 1 else pack({"op": "many"}, batch)

    def _made(self) -> list[bytes]:
        """The later messages, made now (those with something to say)."""
        made = [make() for make in self._later.values()]
        self._later.clear()
        self._due = math.inf
        return [data for data in made if data is not None]

    def close(self) -> None:
        self._send.close()


class Credit:
    """The sender's side of a window: at most ``window`` bytes sent and not yet
    acknowledged, so that the receiver never holds more than that."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.in_flight = 0
        self._room = trio.lowlevel.ParkingLot()

    async def take(self, size: int) -> None:
        """Wait until ``size`` more bytes fit (a chunk alone always fits)."""
        while self.in_flight and self.in_flight + size > self.window:
            await self._room.park()
        self.in_flight += size

    def give(self, size: object) -> None:
        """The receiver has consumed ``size`` bytes; WireError for more than was sent."""
        if not isinstance(size, int) or not 0 <= size <= self.in_flight:
            raise WireError(f"an acknowledgement of {size} bytes, {self.in_flight} in flight")
        self.in_flight -= size
        self._room.unpark_all()

    def close(self) -> None:
        """The stream is over: nobody waits for room any more."""
        self.in_flight = 0
        self._room.unpark_all()


class Inbox(trio.abc.ReceiveChannel[bytes]):
    """The receiver's side of a window: chunks queued until read, refused past
    ``window`` bytes (the sender broke the window); ``consumed(size)`` is called as each
    is read, to acknowledge it."""

    def __init__(self, window: int, consumed: Any) -> None:
        self.window = window
        self.queued = 0
        self.error: str | None = None  # why it ended early, if it did
        self._consumed = consumed
        self._send, self._receive = trio.open_memory_channel[bytes](float("inf"))

    def put(self, data: bytes) -> None:
        if self.queued + len(data) > self.window:
            raise WireError(f"{self.queued + len(data)} bytes sent past a window of "
                            f"{self.window}")
        self.queued += len(data)
        try:
            self._send.send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader has gone: what comes after is dropped

    def end(self, error: str | None = None) -> None:
        self.error = self.error or error
        self._send.close()

    async def receive(self) -> bytes:
        data = await self._receive.receive()
        self.queued -= len(data)
        self._consumed(len(data))
        return data

    async def aclose(self) -> None:
        await self._receive.aclose()
