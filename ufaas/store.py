"""Function records in SQLite (WAL): what was asked, where it ran, how it ended.

Calls are synchronous on purpose: each is one indexed row on a local file, well under a
millisecond in WAL mode, cheaper than the hop to a worker thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ACTIVE = ("pending", "running")
FINISHED = ("succeeded", "failed", "timeout", "cancelled", "error")
STATUSES = ACTIVE + FINISHED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS functions_status ON functions (status, seq);
"""


@dataclass
class Record:
    """One function: its spec, and everything known about its run."""

    id: str
    spec: dict[str, Any]
    status: str = "pending"
    after: str | None = None
    locality: str | None = None
    container: str | None = None  # full id; the API shows the short one
    workdir: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom: bool = False
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    seq: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def public(self) -> dict[str, Any]:
        """The record as the API shows it."""
        return {
            "id": self.id,
            "status": self.status,
            "spec": self.spec,
            "container": self.container[:12] if self.container else None,
            "after": self.after,
            "locality": self.locality,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom": self.oom,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "error": self.error,
        }


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


_FIELDS = {f.name for f in fields(Record)} - {"seq"}


class Store:
    """Records keyed by id, kept in arrival order."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def insert(self, record: Record, spec_json: str | None = None) -> Record:
        """Add a new record; ``spec_json``, when given, is its spec already as JSON."""
        cur = self._db.execute(
            "INSERT INTO functions (id, status, spec, record) VALUES (?, ?, ?, ?)",
            (record.id, record.status, spec_json or _dumps(record.spec), _dump(record)),
        )
        record.seq = cur.lastrowid
        return record

    def save(self, record: Record, *, spec: bool = False) -> None:
        """Write the record back; its spec too only when asked (it rarely changes)."""
        if spec:
            self._db.execute("UPDATE functions SET status = ?, spec = ?, record = ? WHERE id = ?",
                             (record.status, _dumps(record.spec), _dump(record), record.id))
        else:
            self._db.execute("UPDATE functions SET status = ?, record = ? WHERE id = ?",
                             (record.status, _dump(record), record.id))

    def get(self, fid: str) -> Record | None:
        row = self._db.execute("SELECT seq, spec, record FROM functions WHERE id = ?",
                               (fid,)).fetchone()
        return _load(row) if row else None

    def list(self, statuses: tuple[str, ...] | None = ACTIVE, limit: int = 100) -> list[Record]:
        """Newest first; ``statuses`` None means all."""
        if statuses is None:
            rows = self._db.execute(
                "SELECT seq, spec, record FROM functions ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(statuses))
            rows = self._db.execute(
                f"SELECT seq, spec, record FROM functions WHERE status IN ({marks}) "
                "ORDER BY seq DESC LIMIT ?", (*statuses, limit))
        return [_load(r) for r in rows]

    def count(self, status: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM functions WHERE status = ?",
                                (status,)).fetchone()[0]

    def delete(self, fid: str) -> bool:
        return self._db.execute("DELETE FROM functions WHERE id = ?", (fid,)).rowcount > 0

    def recover(self) -> list[Record]:
        """After a crash: end running functions as interrupted; return pending, oldest first."""
        now = time.time()
        for record in self.list(("running",), limit=1 << 30):
            record.status = "error"
            record.error = "interrupted: the server stopped while the function ran"
            record.finished_at = now
            self.save(record)
        return sorted(self.list(("pending",), limit=1 << 30), key=lambda r: r.seq or 0)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _dump(record: Record) -> str:
    # vars(), not asdict(): asdict deep-copies; the spec has its own column, written once.
    data = dict(vars(record))
    del data["seq"], data["spec"]
    return _dumps(data)


def _load(row: tuple[int, str, str]) -> Record:
    data = json.loads(row[2])
    data["spec"] = json.loads(row[1])
    record = Record(**{k: v for k, v in data.items() if k in _FIELDS})
    record.seq = row[0]
    return record
