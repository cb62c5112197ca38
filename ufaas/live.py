"""Live input and output of functions: stdin pipes, output transcripts, and the hub that
offers each function's events to the watchers that follow it.

No I/O here. Functions feed these from the pool and the WebSocket layer drains them; every
buffer has a bound, so a slow or silent client costs the server a fixed amount of memory.
"""

from __future__ import annotations

import codecs
import collections
from dataclasses import dataclass
from typing import Any

import trio

from pool import MiB

# Output is cut into events of at most this many bytes (and replays into as many characters),
# well under any WebSocket client's message limit even once JSON-escaped.
EVENT_BYTES = 65536
WATCHER_EVENTS = 1024
WATCHER_BYTES = 1 * MiB
# Answers to a client's own requests (a replay can be megabytes) waiting to be sent: past
# this many the socket stops reading the client's requests until it reads its answers.
WATCHER_REPLIES = 4
STDIN_BYTES = 1 * MiB
STREAMS = {1: "stdout", 2: "stderr"}

Event = dict[str, Any]


class StdinClosed(Exception):
    """The function's stdin has had its end-of-file, or the function has ended."""


class StdinPipe(trio.abc.ReceiveChannel[bytes]):
    """Bytes for one function's stdin, at most about ``limit`` of them queued.

    The pool receives from it; ``send(..., eof=True)`` or ``close()`` ends it.
    """

    def __init__(self, *, limit: int = STDIN_BYTES) -> None:
        self.limit = limit
        self.queued = 0
        self.closed = False
        self._send, self._receive = trio.open_memory_channel[bytes](float("inf"))
        self._room = trio.lowlevel.ParkingLot()

    async def send(self, data: bytes, eof: bool = False) -> None:
        """Queue ``data``, first waiting while ``limit`` bytes wait to be read; raise
        StdinClosed after end-of-file (also once the function has ended)."""
        while data and self.queued and self.queued + len(data) > self.limit and not self.closed:
            await self._room.park()
        if self.closed:
            raise StdinClosed("stdin is closed")
        if data:
            self._send.send_nowait(data)
            self.queued += len(data)
        if eof:
            self.close()

    def close(self) -> None:
        """End-of-file: the function reads what is queued, then nothing more."""
        self.closed = True
        self._send.close()
        self._room.unpark_all()

    async def receive(self) -> bytes:
        data = await self._receive.receive()
        self.queued -= len(data)
        self._room.unpark_all()
        return data

    async def aclose(self) -> None:
        await self._receive.aclose()


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class Transcript:
    """A function's output, the one copy of it: the text events sent live, from which the
    record's stdout and stderr and a late watcher's replay are both read.

    Decoding is incremental, so a character cut between two chunks is not mangled, and the
    replay is exactly what a watcher from the start has seen.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[str, str]] = []
        self._decoders = {1: _decoder(), 2: _decoder()}

    def add(self, fd: int, data: bytes) -> list[tuple[str, str]]:
        """Decode a chunk of stream ``fd``: the new (stream, text) parts."""
        new = []
        for i in range(0, len(data), EVENT_BYTES):
            text = self._decoders[fd].decode(data[i:i + EVENT_BYTES])
            if text:
                new.append((STREAMS[fd], text))
        self.parts.extend(new)
        return new

    def close(self) -> list[tuple[str, str]]:
        """The end of both streams: a trailing partial character, if any."""
        new = [(STREAMS[fd], text) for fd, d in self._decoders.items()
               if (text := d.decode(b"", final=True))]
        self.parts.extend(new)
        return new

    def text(self, stream: str) -> str:
        """All of ``stream`` (``stdout`` or ``stderr``) so far."""
        return "".join(text for name, text in self.parts if name == stream)

    def events(self, fid: str) -> list[Event]:
        """Everything so far, consecutive parts of one stream joined, cut to EVENT_BYTES."""
        joined: list[list[Any]] = []
        for stream, text in self.parts:
            if joined and joined[-1][0] == stream:
                joined[-1][1].append(text)
            else:
                joined.append([stream, [text]])
        return [e for stream, texts in joined for e in output_events(fid, stream, "".join(texts))]


def output_events(fid: str, stream: str, text: str) -> list[Event]:
    return [{"event": stream, "id": fid, "data": text[i:i + EVENT_BYTES]}
            for i in range(0, len(text), EVENT_BYTES)]


@dataclass(frozen=True)
class WatcherStatistics:
    following: int
    everything: bool
    buffered_events: int
    buffered_bytes: int
    peak_events: int
    peak_bytes: int
    dropped: int
    max_events: int
    max_bytes: int


def _size(event: Event) -> int:
    return len(event.get("data", "")) + 64


class Watcher:
    """What one client follows, and its events waiting to be sent.

    Live events are offered without ever blocking the function that makes them. Past
    ``max_events`` or ``max_bytes`` buffered, an event is dropped and its function is no
    longer followed; once the client has read what came before the gap it gets one
    ``missed`` error event for that function, and may watch it again (a fresh replay).
    """

    def __init__(self, *, max_events: int = WATCHER_EVENTS, max_bytes: int = WATCHER_BYTES,
                 max_replies: int = WATCHER_REPLIES) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_replies = max_replies
        self.ids: set[str] = set()
        self.everything = False
        # Each item: (events, live). Live items count towards the bound, replies do not.
        self._queue: collections.deque[tuple[list[Event], bool]] = collections.deque()
        self._events = 0
        self._bytes = 0
        self._replies = 0
        self._peak_events = 0
        self._peak_bytes = 0
        self._dropped = 0
        self._missed: dict[str, None] = {}
        self._readable = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()

    def follow(self, fid: str) -> None:
        """Get the live events of function ``fid`` (``*``: the status events of all)."""
        if fid == "*":
            self.everything = True
        else:
            self.ids.add(fid)

    def follows(self, fid: str) -> bool:
        return fid in self.ids

    def offer(self, event: Event) -> None:
        """A live event: buffered if this watcher follows it and has room, else dropped."""
        fid = event["id"]
        if fid in self.ids:
            key = fid
            if event["event"] == "exit":
                self.ids.discard(fid)
        elif self.everything and event["event"] == "status":
            key = "*"
        else:
            return
        size = _size(event)
        full = self._events >= self.max_events or self._bytes + size > self.max_bytes
        if full and self._events:
            self._dropped += 1
            if key == "*":
                self.everything = False
            else:
                self.ids.discard(fid)
            self._missed[key] = None
            return
        self._queue.append(([event], True))
        self._events += 1
        self._bytes += size
        self._peak_events = max(self._peak_events, self._events)
        self._peak_bytes = max(self._peak_bytes, self._bytes)
        self._readable.unpark_all()

    def reply(self, events: list[Event]) -> None:
        """Answers to the client's own request, sent in order with the live events."""
        if events:
            self._queue.append((events, False))
            self._replies += 1
            self._readable.unpark_all()

    async def wait_room(self) -> None:
        """Wait until the client has read enough answers to take another request."""
        while self._replies >= self.max_replies:
            await self._room.park()

    async def receive(self) -> list[Event]:
        """The next events to send, waiting for some; a ``missed`` notice after a gap."""
        while True:
            if self._queue:
                events, live = self._queue.popleft()
                if not live:
                    self._replies -= 1
                    self._room.unpark_all()
                    return events
                event = self._take(events[0])
                if "data" in event:
                    # A client behind gets fewer, bigger messages: it catches up sooner.
                    while (self._queue and self._queue[0][1]
                           and (following := self._queue[0][0][0])["event"] == event["event"]
                           and following["id"] == event["id"]
                           and len(event["data"]) + len(following["data"]) <= EVENT_BYTES):
                        self._queue.popleft()
                        self._take(following)
                        event = {**event, "data": event["data"] + following["data"]}
                return [event]
            if self._missed:
                key = next(iter(self._missed))
                del self._missed[key]
                return [{"event": "error", "id": key, "missed": True,
                         "message": "missed output: this client read too slowly; "
                                    "send watch again to get the rest"}]
            await self._readable.park()

    def _take(self, event: Event) -> Event:
        self._events -= 1
        self._bytes -= _size(event)
        return event

    def statistics(self) -> WatcherStatistics:
        return WatcherStatistics(
            following=len(self.ids), everything=self.everything,
            buffered_events=self._events, buffered_bytes=self._bytes,
            peak_events=self._peak_events, peak_bytes=self._peak_bytes,
            dropped=self._dropped, max_events=self.max_events, max_bytes=self.max_bytes,
        )


class Hub:
    """The watchers of one server (one per WebSocket client), and the events offered to them.

    ``publish`` never blocks: each watcher buffers what it follows, within its own bounds.
    """

    def __init__(self, *, max_bytes: int = WATCHER_BYTES) -> None:
        self.max_bytes = max_bytes
        self.subscribed = 0  # watchers ever made
        self._watchers: set[Watcher] = set()

    @property
    def watching(self) -> int:
        """Watchers now (clients connected)."""
        return len(self._watchers)

    def subscribe(self, **limits: int) -> Watcher:
        """A new watcher; ``unsubscribe`` it when its client goes."""
        watcher = Watcher(**{"max_bytes": self.max_bytes, **limits})
        self._watchers.add(watcher)
        self.subscribed += 1
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def publish(self, event: Event) -> None:
        for watcher in self._watchers:
            watcher.offer(event)

    def statistics(self) -> list[WatcherStatistics]:
        return [w.statistics() for w in self._watchers]
