"""One function from its acceptance to its end.

A :class:`Function` owns its record and every change to it (each one saved as it happens),
the one copy of its output (a :class:`~ufaas.live.Transcript`), its live stdin and its cancel
scope. :meth:`Function.run` is its whole life: wait for a container, run, record the end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from pool import Job, Outputs, PoolError, Result

from .cluster import Unclaimed
from .fetch import FetchError
from .live import Event, Hub, StdinPipe, Transcript
from .spec import Spec, SpecError
from .store import Record, Store

if TYPE_CHECKING:
    from .cluster import AnyLease
    from .scheduler import Scheduler

log = logging.getLogger("ufaas")

SHUTDOWN = "cancelled by server shutdown"
OOM = "out of memory: the function went past its memory limit"


class Function:
    """A function the server has accepted and not yet finished.

    ``spec`` is the validated spec while it is at hand; when None it is read back from the
    store as the function starts. ``dequeued`` is called once, when the function stops
    being pending (it started, or it ended without starting).
    """

    def __init__(self, record: Record, store: Store, hub: Hub, *, spec: Spec | None = None,
                 strict: bool = False, interactive: bool = False, lease: AnyLease | None = None,
                 unsaved: tuple[bytes, str | None] | None = None,
                 dequeued: Callable[[Function], None] = lambda function: None) -> None:
        self.record = record
        # A new record not yet saved: its spec as sent and callback target (see persist).
        self._unsaved = unsaved
        self.accepted = trio.current_time()
        self.spec = spec
        self.pinned = False  # its spec counts against the scheduler's pending_bytes
        self._lease = lease  # claimed when it was accepted (see started_in)
        self.strict = strict
        self.transcript = Transcript()
        self.stdin = StdinPipe() if interactive else None
        self.scope = trio.CancelScope()
        self.started = trio.Event()  # running, or ended without running
        self.ended = trio.Event()  # its final record is saved
        self.done = trio.Event()  # and its container given back, its end announced
        self.changed = trio.Event()  # a PUT gave it a new spec
        self.requeue: trio.CancelScope | None = None  # cancelled to queue it elsewhere
        self.cancel_requested = False
        self.discard = False
        self.waited = 0.0  # seconds it waited for a container of its pool
        self._store = store
        self._hub = hub
        self._dequeued = dequeued

    @staticmethod
    def started_in(record: Record, lease: AnyLease) -> None:
        """Fill in a new record as running in ``lease``, before it is first saved."""
        record.status = "running"
        record.started_at = time.time()
        record.container, record.workdir = lease.place.container, lease.place.workdir
        record.node = lease.place.node
        record.locality = None if lease.hit is None else ("hit" if lease.hit else "miss")

    @property
    def saved(self) -> bool:
        return self._unsaved is None

    def persist(self, *, announce: bool = True) -> None:
        """Save the new record, if it is not yet (see :meth:`Scheduler.submit`'s
        ``waited``), and announce it to the watchers of all functions."""
        if self._unsaved is not None:
            spec_json, callback = self._unsaved
            self._store.insert(self.record, spec_json, callback)
            self._unsaved = None
            if announce:
                self.announce()

    def announce(self) -> None:
        """Tell the watchers its status as it is now."""
        self._hub.publish({"event": "status", "id": self.id, "status": self.status})

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> str:
        return self.record.status

    def snapshot(self) -> Record:
        """The record as it is now, with the output so far while it runs."""
        if self.record.status != "running":
            return self.record
        return dataclasses.replace(self.record, stdout=self.transcript.text("stdout"),
                                   stderr=self.transcript.text("stderr"))

    def replay(self) -> list[Event]:
        """What a watcher that starts following now must first get: status, output so far."""
        record = self.record
        # Finished but not yet announced: its final status comes live with its exit.
        status = record.status if not record.finished else (
            "running" if record.started_at else "pending")
        return [{"event": "status", "id": self.id, "status": status},
                *self.transcript.events(self.id)]

    def change(self, spec: Spec | None, summary: dict[str, Any], spec_json: bytes,
               callback: str | None, *, moved: bool) -> None:
        """A PUT: the new spec of this pending function (None: read back when it starts)
        and its callback target, saved; ``moved`` when it now belongs to another pool, where
        it queues again."""
        self.record.spec = summary
        self._store.replace_spec(self.record, spec_json, callback)
        self.spec = spec
        self.changed.set()
        if moved and self.requeue is not None:
            self.requeue.cancel()

    def cancel(self, *, remove_container: bool = False) -> None:
        """Pending: it never starts. Running: it is killed. ``remove_container``: its
        container goes too."""
        self.cancel_requested = True
        self.discard = self.discard or remove_container
        self.scope.cancel()

    # -- its life ---------------------------------------------------------------------------

    async def run(self, scheduler: Scheduler) -> None:
        """Run to the end, whatever happens; on cancellation from outside (server
        shutdown) a running function ends cancelled, a pending one stays pending."""
        try:
            with self.scope:
                await self._run(scheduler)
            if self.scope.cancelled_caught and not self.record.finished:
                self._end("cancelled", None if self.cancel_requested else SHUTDOWN)
        except Exception as exc:  # a bug must end one function, not the server
            log.exception("function %s failed inside ufaas", self.id)
            self._end("error", f"internal error: {exc}")
        finally:
            if self._lease is not None:  # cancelled before it could start
                self._lease.release()
            if self.record.status == "running":
                self._end("cancelled", SHUTDOWN)
            if self.stdin is not None:
                self.stdin.close()
            self.spec = None
            self.started.set()
            self.done.set()
            self.announce()
            self._hub.publish(exit_event(self.record))

    async def _run(self, scheduler: Scheduler) -> None:
        if self._lease is not None:  # accepted as running: straight to its container
            lease, self._lease = self._lease, None
            assert self.spec is not None
            try:
                return await self._execute(lease, self.spec, self.spec.files(), scheduler)
            except Unclaimed as exc:  # it never started there: it waits as others do
                self._back_in_queue(scheduler, exc)
            finally:
                lease.release()
        near = await scheduler.place_of(self.record.after) if self.record.after else None
        while True:
            # A PUT sets `changed` and, when the function moves to another pool, cancels
            # `requeue`: whatever it interrupts (a download, the wait for a container), the
            # function starts over with the spec its record now shows.
            changed = self.changed = trio.Event()
            with trio.CancelScope() as self.requeue:
                # A spec at hand has its URLs fetched before the wait for a container; one
                # that waits on disk is read back, and fetched for, once it holds one.
                spec = self.spec
                try:
                    files = await scheduler.files(spec) if spec is not None else []
                    if changed.is_set():
                        continue
                    pool = await scheduler.pool_for(self.record.spec)
                    queued = trio.current_time()
                    async with pool.lease(near, strict=self.strict,
                                          timeout=scheduler.config.queue_timeout) as lease:
                        self.waited += trio.current_time() - queued
                        if changed.is_set():
                            continue
                        if spec is None:
                            spec = await scheduler.load_spec(self.record)
                            files = await scheduler.files(spec)
                        try:
                            return await self._execute(lease, spec, files, scheduler)
                        except Unclaimed as exc:  # its node went first: another lease
                            self._back_in_queue(scheduler, exc)
                except (FetchError, PoolError, SpecError) as exc:
                    return self._end("error", str(exc))
            self.requeue = None

    def _back_in_queue(self, scheduler: Scheduler, why: Unclaimed) -> None:
        """Its container (or that container's node) went before its run came: pending, as
        it never started."""
        log.info("function %s: %s; waiting for another container", self.id, why)
        record = self.record
        record.status = "pending"
        record.started_at = record.container = record.workdir = None
        record.node = record.locality = None
        self.started = trio.Event()
        scheduler.requeued(self)
        if self.saved:
            self._store.save(record)
            self.announce()
        else:
            self.persist()

    async def _execute(self, lease: AnyLease, spec: Spec, files: list, scheduler: Scheduler
                       ) -> None:
        record = self.record
        if record.status == "pending":
            self._dequeued(self)
            self.started_in(record, lease)
            self._store.save(record)
            self.announce()
        self.started.set()
        config = scheduler.config
        outputs, writer = None, None
        if spec.outputs:  # room on disk is granted first: the budget cuts, never overflows
            writer = scheduler.files_store.writer(self.id, config.output_max_total)
            outputs = Outputs(tuple(spec.outputs), max_file=config.output_max_file,
                              max_total=writer.granted, max_count=config.output_max_count)
        job = Job(spec.argv(), files=files, env=dict(spec.env),
                  stdin=spec.stdin.encode() if spec.stdin is not None else None,
                  timeout=spec.timeout, output_cap=config.output_cap, id=self.id,
                  fresh=spec.fresh_interpreter, cpu_limit=spec.cpu_limit,
                  memory_limit=spec.memory_limit, outputs=outputs)
        try:
            result = await lease.run(job, self._output, self.stdin,
                                     writer.on_file if writer is not None else None)
        finally:
            lease.discard = self.discard
            if writer is not None:
                await writer.close()
        if writer is not None:
            self.record.files, self.record.files_truncated, self.record.files_error = (
                writer.outcome(result))
        self._record_result(result)
        # Whoever waits for the record answers first; the container goes back after.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _output(self, fd: int, data: bytes) -> None:
        for stream, text in self.transcript.add(fd, data):
            self._hub.publish({"event": stream, "id": self.id, "data": text})

    def _record_result(self, result: Result) -> None:
        record = self.record
        record.truncated = result.truncated
        record.exit_code, record.signal, record.oom = result.exit_code, result.signal, result.oom
        record.duration_ms = result.duration_ms
        record.forked, record.cpu_ms, record.max_rss = (result.forked, result.cpu_ms,
                                                        result.max_rss)
        if result.outcome == "exited":
            self._end("succeeded" if result.exit_code == 0 else "failed",
                      OOM if result.oom else None)
        elif result.outcome == "refused":
            self._end("error", f"refused: {result.error}")
        else:
            self._end(result.outcome, result.error)

    def _end(self, status: str, error: str | None) -> None:
        record = self.record
        if record.status == "pending":
            self._dequeued(self)
        for stream, text in self.transcript.close():
            self._hub.publish({"event": stream, "id": self.id, "data": text})
        record.stdout = self.transcript.text("stdout")
        record.stderr = self.transcript.text("stderr")
        record.status, record.error = status, error
        record.finished_at = time.time()
        if self.saved:
            self._store.save(record)
        else:  # the one write of a function nobody was told of before it ended
            self.persist(announce=False)
        self.ended.set()


def exit_event(record: Record) -> dict[str, Any]:
    event: dict[str, Any] = {"event": "exit", "id": record.id, "status": record.status,
             "exit_code": record.exit_code, "signal": record.signal, "error": record.error}
    if record.files is not None:
        event["files"], event["files_truncated"] = record.files, record.files_truncated
    return event
