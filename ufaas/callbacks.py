"""Callbacks: when a function with a ``callback`` ends, its final record is POSTed there.

At least once, across restarts: a callback is a row of the store from the function's
acceptance; it becomes due as the function ends (in the transaction that records the
end), and goes only with a 2xx answer or its last attempt. Each attempt has a deadline,
the next waits twice as long as the one before, and the outcome is written in the record.
The URL passes the downloads' address policy when the spec is submitted and again at every
connection; the body is signed with HMAC-SHA256 when ``callback_secret`` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx
import trio

from . import __version__
from .fetch import AddressPolicy, Forbidden, policy_client
from .store import Record, Store

log = logging.getLogger("ufaas")

CONCURRENT = 16
MAX_DELAY = 3600.0
# The receiver's answer is read this far, to say what went wrong.
ANSWER_BYTES = 512
POLL = 60.0  # how often due callbacks are looked for when nothing wakes the sender
SIGNATURE = "X-Ufaas-Signature"


def signature(secret: str, body: bytes) -> str:
    """What the signature header holds for ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def pending() -> dict[str, Any]:
    """A new function's callback, as its record shows it."""
    return {"status": "pending", "attempts": 0, "last_error": None}


class Callbacks:
    """Sends due callbacks; ``wake()`` when one may have become due."""

    def __init__(self, store: Store, *, secret: str | None, timeout: float, attempts: int,
                 backoff: float, allow: list[str], proxy: str | None) -> None:
        self.store = store
        self.secret = secret
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._policy = AddressPolicy(allow)
        self._proxy = proxy
        self._wake = trio.Event()
        self._sending: set[int] = set()
        self.delivered = 0
        self.failed = 0

    def wake(self) -> None:
        self._wake.set()

    def statistics(self) -> dict[str, int]:
        return {"sending": len(self._sending), "delivered": self.delivered,
                "failed": self.failed}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        client = policy_client(self._policy, self._proxy)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    now = time.time()
                    # Those being sent are due too: as many again as may be sent at once.
                    due, after = self.store.due_callbacks(now, CONCURRENT)
                    for seq, target, attempts in due:
                        if seq not in self._sending and len(self._sending) < CONCURRENT:
                            self._sending.add(seq)
                            nursery.start_soon(self._send, client, seq, target, attempts)
                    wait = POLL if after is None else min(max(after - now, 0.0), POLL)
                    with trio.move_on_after(wait):
                        await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()

    async def _send(self, client: httpx.AsyncClient, seq: int, target: str,
                    attempts: int) -> None:
        try:
            record = self.store.by_seq(seq)
            if record is None:
                return  # purged meanwhile: its row went with it
            attempt = attempts + 1
            error, final = await self._attempt(client, record, json.loads(target), attempt)
            callback = record.callback or {}
            callback.update(attempts=attempt, last_error=error)
            due = None
            if error is None:
                callback["status"] = "delivered"
                self.delivered += 1
            elif final or attempt >= self.attempts:
                callback["status"] = "failed"
                self.failed += 1
                log.warning("callback of %s failed after %d attempts: %s", record.id,
                            attempt, error)
            else:
                due = time.time() + min(self.backoff * 2 ** (attempt - 1), MAX_DELAY)
            record.callback = callback
            self.store.callback_attempted(record, due)
        finally:
            self._sending.discard(seq)
            self.wake()

    async def _attempt(self, client: httpx.AsyncClient, record: Record, target: dict[str, Any],
                       attempt: int) -> tuple[str | None, bool]:
        """One POST of the record: None when a 2xx answered, else what went wrong; and
        whether trying again is pointless (the address policy refuses the URL)."""
        body = json.dumps(record.public()).encode()
        headers = {**target.get("headers", {}), "Content-Type": "application/json",
                   "User-Agent": f"ufaas/{__version__}", "X-Ufaas-Function": record.id,
                   "X-Ufaas-Attempt": str(attempt)}
        if self.secret:
            headers[SIGNATURE] = signature(self.secret, body)
        url = target["url"]
        try:
            with trio.fail_after(self.timeout):
                async with client.stream("POST", url, content=body,
                                         headers=headers) as answer:
                    if 200 <= answer.status_code < 300:
                        return None, False
                    said = b""
                    async for chunk in answer.aiter_raw():
                        said += chunk
                        if len(said) >= ANSWER_BYTES:
                            break
                    text = said[:ANSWER_BYTES].decode(errors="replace").strip()
                    return f"HTTP {answer.status_code} {answer.reason_phrase}" + (
                        f": {text}" if text else ""), False
        except trio.TooSlowError:
            return f"no answer within {self.timeout:g} s", False
        except Forbidden as exc:  # says "address policy: ..."
            return str(exc), True
        except (httpx.HTTPError, OSError) as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), False
