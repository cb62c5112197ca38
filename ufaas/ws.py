"""The WebSocket API: one client's JSON messages in, its functions' events out.

Knows nothing of the transport: :func:`serve_socket` takes ``receive`` and ``send``
callables, so the same code serves any WebSocket server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter
from pydantic import ValidationError as PydanticError

from .live import Watcher
from .parser import Parsed
from .scheduler import Conflict, NotFound, QueueFull, Scheduler
from .spec import BadJSON, SpecError, Text

log = logging.getLogger("ufaas")

Id = Annotated[StrictStr, Field(min_length=1, max_length=100)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunMessage(_Message):
    op: Literal["run"]
    spec: dict[str, Any]
    after: Id | None = None
    strict: StrictBool = False


class WatchMessage(_Message):
    op: Literal["watch"]
    id: Id


class StdinMessage(_Message):
    op: Literal["stdin"]
    id: Id
    data: Text = ""  # valid UTF-8: a lone surrogate gets an error event, not a dead socket
    eof: StrictBool = False


class CancelMessage(_Message):
    op: Literal["cancel"]
    id: Id


Message = TypeAdapter(Annotated[RunMessage | WatchMessage | StdinMessage | CancelMessage,
                                Field(discriminator="op")])
OP_NAMES = ("run", "watch", "stdin", "cancel")
OPS = ", ".join(OP_NAMES[:-1]) + " or " + OP_NAMES[-1]


def error_event(message: str, fid: str | None = None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event": "error", "message": message, **extra}
    if fid is not None:
        event["id"] = fid
    return event


AnyMessage = RunMessage | WatchMessage | StdinMessage | CancelMessage


async def read(raw: str | bytes, scheduler: Scheduler) -> tuple[AnyMessage, Parsed | None]:
    """Decode one client message, and for a big one also validate the spec it holds (both
    off the event loop, see ufaas.parser); raise ValueError or SpecError for the client."""
    if isinstance(raw, bytes):
        raise ValueError("send JSON text messages, not binary ones")
    if scheduler.parser.is_small(raw):
        return parse(raw), None
    try:
        parsed = await scheduler.parser.parse(raw.encode(errors="surrogatepass"),
                                              inside="spec")
    except BadJSON as exc:
        raise ValueError(str(exc)) from None
    if parsed.spec is None:
        return validate(parsed.envelope), None
    return validate({**parsed.envelope, "spec": {}}), parsed


def parse(raw: str) -> AnyMessage:
    """Decode one client message; raise ValueError with a message for the client."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    return validate(data)


def validate(data: Any) -> AnyMessage:
    if not isinstance(data, dict) or data.get("op") not in OP_NAMES:
        raise ValueError(f"a message is a JSON object whose op is {OPS}")
    try:
        return Message.validate_python(data)
    except PydanticError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'message'}: "
                             f"{e['msg']}" for e in exc.errors())
        raise ValueError(f"bad {data['op']} message: {problems}") from None


async def serve_socket(scheduler: Scheduler, receive: Callable[[], Awaitable[str | bytes]],
                       send: Callable[[str], Awaitable[None]]) -> None:
    """Serve one WebSocket client until it goes away (the caller cancels us then).

    The functions this client created get their stdin's end-of-file when it goes. A
    client that sends stdin faster than its function reads it is itself read more slowly.
    """
    watcher = scheduler.hub.subscribe()
    created: set[str] = set()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_events, watcher, send)
            while True:
                raw = await receive()
                # A client that does not read its answers stops being read.
                await watcher.wait_room()
                try:
                    message, parsed = await read(raw, scheduler)
                except ValueError as exc:
                    watcher.reply([error_event(str(exc))])
                    continue
                except SpecError as exc:
                    watcher.reply([error_event(exc.message, detail=exc.errors)])
                    continue
                await _handle(scheduler, watcher, nursery, created, message, parsed)
    finally:
        scheduler.hub.unsubscribe(watcher)
        for fid in created:
            scheduler.close_stdin(fid)


async def _send_events(watcher: Watcher, send: Callable[[str], Awaitable[None]]) -> None:
    while True:
        for event in await watcher.receive():
            await send(json.dumps(event))


async def _handle(scheduler: Scheduler, watcher: Watcher, nursery: trio.Nursery,
                  created: set[str], message: AnyMessage, parsed: Parsed | None) -> None:
    try:
        if isinstance(message, RunMessage):
            function = await scheduler.submit(data=message.spec, parsed=parsed,
                                              after=message.after, strict=message.strict,
                                              interactive=True)
            created.difference_update([f for f in created if not scheduler.is_active(f)])
            created.add(function.id)
            # Created and followed in one step: not one event can slip between.
            watcher.reply([{"event": "created", "id": function.id},
                           *scheduler.watch(function.id, watcher)])
        elif isinstance(message, WatchMessage):
            watcher.reply(scheduler.watch(message.id, watcher))
        elif isinstance(message, StdinMessage):
            await scheduler.feed(message.id, message.data.encode(), message.eof)
        else:
            nursery.start_soon(_cancel, scheduler, watcher, message.id)
    except SpecError as exc:
        watcher.reply([error_event(exc.message, detail=exc.errors)])
    except (NotFound, Conflict, QueueFull) as exc:
        fid = None if isinstance(message, RunMessage) else message.id
        watcher.reply([error_event(str(exc), fid)])


async def _cancel(scheduler: Scheduler, watcher: Watcher, fid: str) -> None:
    following = watcher.follows(fid)  # a follower learns the outcome from its live events
    try:
        record = await scheduler.cancel(fid)
    except NotFound as exc:
        watcher.reply([error_event(str(exc), fid)])
        return
    if not following:
        watcher.reply([{"event": "status", "id": fid, "status": record.status}])
