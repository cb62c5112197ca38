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

# The spec has a table of its own: SQLite rewrites a whole row on every UPDATE, and a
# spec with embedded files can be megabytes, written once but updated past twice.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS functions_status ON functions (status, seq);
CREATE TABLE IF NOT EXISTS specs (
    seq INTEGER PRIMARY KEY,
    spec TEXT NOT NULL
);
"""
_SCHEMA_VERSION = 1
# Version 0 kept the spec in a column of functions: the tables of _SCHEMA take its rows.
_MIGRATE_FROM_0 = f"""
ALTER TABLE functions RENAME TO functions_v0;
DROP INDEX functions_status;
{_SCHEMA}
INSERT INTO functions (seq, id, status, record) SELECT seq, id, status, record FROM functions_v0;
INSERT INTO specs (seq, spec) SELECT seq, spec FROM functions_v0;
DROP TABLE functions_v0;
"""
_SELECT = ("SELECT f.seq, s.spec, f.record FROM functions f "
           "JOIN specs s ON s.seq = f.seq")


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
        self._migrate()
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(functions)")}
        if version == 0 and "spec" in columns:
            try:
                self._db.executescript(f"BEGIN; {_MIGRATE_FROM_0} COMMIT;")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    def insert(self, record: Record, spec_json: str | None = None) -> Record:
        """Add a new record; ``spec_json``, when given, is its spec already as JSON."""
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            cur = self._db.execute(
                "INSERT INTO functions (id, status, record) VALUES (?, ?, ?)",
                (record.id, record.status, _dump(record)))
            self._db.execute("INSERT INTO specs (seq, spec) VALUES (?, ?)",
                             (cur.lastrowid, spec_json or _dumps(record.spec)))
        record.seq = cur.lastrowid
        return record

    def save(self, record: Record, *, spec: bool = False) -> None:
        """Write the record back; its spec too only when asked (it rarely changes)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE functions SET status = ?, record = ? WHERE id = ?",
                             (record.status, _dump(record), record.id))
            if spec:
                self._db.execute(
                    "UPDATE specs SET spec = ? WHERE seq = (SELECT seq FROM functions "
                    "WHERE id = ?)", (_dumps(record.spec), record.id))

    def get(self, fid: str) -> Record | None:
        row = self._db.execute(f"{_SELECT} WHERE f.id = ?", (fid,)).fetchone()
        return _load(row) if row else None

    def list(self, statuses: tuple[str, ...] | None = ACTIVE, limit: int = 100) -> list[Record]:
        """Newest first; ``statuses`` None means all."""
        if statuses is None:
            rows = self._db.execute(f"{_SELECT} ORDER BY f.seq DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(statuses))
            rows = self._db.execute(
                f"{_SELECT} WHERE f.status IN ({marks}) ORDER BY f.seq DESC LIMIT ?",
                (*statuses, limit))
        return [_load(r) for r in rows]

    def count(self, status: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM functions WHERE status = ?",
                                (status,)).fetchone()[0]

    def delete(self, fid: str) -> bool:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM specs WHERE seq = (SELECT seq FROM functions "
                             "WHERE id = ?)", (fid,))
            return self._db.execute("DELETE FROM functions WHERE id = ?",
                                    (fid,)).rowcount > 0

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
