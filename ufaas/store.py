"""Function records in SQLite (WAL): what was asked, where it ran, how it ended.

Two tables share one key: ``functions`` holds each record (its output too, written once as
it ends), ``specs`` the spec as sent, read only to run it or when asked for: a listing never
reads it, and the updates a record gets while it runs never rewrite it. Calls are
synchronous on purpose: each is one indexed row on a local file, cheaper than the hop to a
worker thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ACTIVE = ("pending", "running")
FINISHED = ("succeeded", "failed", "timeout", "cancelled", "error")
STATUSES = ACTIVE + FINISHED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS functions_status ON functions (status, seq);
CREATE TABLE IF NOT EXISTS specs (
    seq INTEGER PRIMARY KEY,
    spec BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS callbacks (
    seq INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    due REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS callbacks_due ON callbacks (due);
"""
_SCHEMA_VERSION = 2
# Version 0 kept the spec in a column of functions: the tables of version 1 take its rows.
_MIGRATE_FROM_0 = """
ALTER TABLE functions RENAME TO functions_v0;
DROP INDEX functions_status;
CREATE TABLE functions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX functions_status ON functions (status, seq);
CREATE TABLE specs (seq INTEGER PRIMARY KEY, spec TEXT NOT NULL);
INSERT INTO functions (seq, id, status, record) SELECT seq, id, status, record FROM functions_v0;
INSERT INTO specs (seq, spec) SELECT seq, spec FROM functions_v0;
DROP TABLE functions_v0;
"""
# Version 1 kept the output inside each record, and records had no spec summary.
_MIGRATE_FROM_1 = """
ALTER TABLE functions ADD COLUMN stdout TEXT NOT NULL DEFAULT '';
ALTER TABLE functions ADD COLUMN stderr TEXT NOT NULL DEFAULT '';
"""
_SELECT = "SELECT seq, record, stdout, stderr FROM functions"


@dataclass
class Record:
    """One function: its spec as records show it (see ``Spec.summary``), and its run."""

    id: str
    spec: dict[str, Any]
    status: str = "pending"
    after: str | None = None
    locality: str | None = None
    container: str | None = None  # full id; the API shows the short one
    workdir: str | None = None
    node: str | None = None  # in a cluster: the node of the container
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
    # How it started (forked from a warm interpreter, or not), the CPU time it used and
    # its peak memory in bytes, from the kernel's accounting of its process.
    forked: bool | None = None
    cpu_ms: float | None = None
    max_rss: int | None = None
    error: str | None = None
    # The output files kept ({path, size, sha256, truncated}; None when none were asked
    # for), whether some were left out, and why collecting them failed.
    files: list[dict[str, Any]] | None = None
    files_truncated: bool = False
    files_error: str | None = None
    # The callback's delivery: {status: pending | delivered | failed, attempts, last_error}.
    callback: dict[str, Any] | None = None
    seq: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def public(self, *, output: bool = True) -> dict[str, Any]:
        """The record as the API shows it; listings leave the output out."""
        shown: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "spec": self.spec,
            "container": self.container[:12] if self.container else None,
            "node": self.node,
            "after": self.after,
            "locality": self.locality,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom": self.oom,
            "truncated": self.truncated,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "forked": self.forked,
            "cpu_ms": self.cpu_ms,
            "max_rss": self.max_rss,
            "error": self.error,
        }
        if self.files is not None:
            shown["files"], shown["files_truncated"] = self.files, self.files_truncated
            if self.files_error is not None:
                shown["files_error"] = self.files_error
        if self.callback is not None:
            shown["callback"] = self.callback
        if output:
            shown["stdout"], shown["stderr"] = self.stdout, self.stderr
        return shown


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


_FIELDS = {f.name for f in fields(Record)} - {"seq", "stdout", "stderr"}
# After a crash, what a function that was running when the server stopped says.
INTERRUPTED = "interrupted: the server stopped while the function ran"


class Store:
    """Records keyed by id, kept in arrival order.

    ``summarize`` turns a stored spec (a decoded JSON object) into its record summary; it
    is needed only to migrate a database of version 1 or older.
    """

    def __init__(self, path: str | Path,
                 summarize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate(summarize)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _migrate(self, summarize: Callable[[dict[str, Any]], dict[str, Any]] | None) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "functions" not in tables or version >= _SCHEMA_VERSION:
            return
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(functions)")}
        # One transaction for all of it: executescript() would commit half-way.
        with self._transaction():
            steps = (_MIGRATE_FROM_0 if "spec" in columns else "") + _MIGRATE_FROM_1
            for statement in steps.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            rows = self._db.execute(
                "SELECT f.seq, f.record, s.spec FROM functions f JOIN specs s "
                "ON s.seq = f.seq").fetchall()
            for seq, raw, spec in rows:
                data = json.loads(raw)
                stdout, stderr = data.pop("stdout", ""), data.pop("stderr", "")
                spec_data = json.loads(spec)
                data["spec"] = (summarize(spec_data) if summarize is not None
                                else spec_data)
                self._db.execute(
                    "UPDATE functions SET record = ?, stdout = ?, stderr = ? WHERE seq = ?",
                    (_dumps(data), stdout, stderr, seq))

    def _transaction(self) -> sqlite3.Connection:
        self._db.execute("BEGIN")
        return self._db  # its context manager commits, or rolls back on an exception

    def close(self) -> None:
        self._db.close()

    def insert(self, record: Record, spec: bytes | str, callback: str | None = None
               ) -> Record:
        """Add a new record (its output too: it may have ended already) with its spec as
        sent (JSON), and its callback's target (JSON: url and headers), due once the
        function ends."""
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO functions (id, status, record, stdout, stderr) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.id, record.status, _dump(record), record.stdout, record.stderr))
            self._db.execute("INSERT INTO specs (seq, spec) VALUES (?, ?)",
                             (cur.lastrowid, spec))
            if callback is not None:
                self._db.execute("INSERT INTO callbacks (seq, target, due) VALUES (?, ?, ?)",
                                 (cur.lastrowid, callback,
                                  time.time() if record.finished else None))
        record.seq = cur.lastrowid
        return record

    def save(self, record: Record) -> None:
        """Write the record back, its output too (empty until it has finished). A finished
        record with a callback makes the callback due, in the same transaction."""
        if record.finished and record.callback is not None and \
                record.callback.get("status") == "pending" and not record.callback["attempts"]:
            with self._transaction():
                self._save(record)
                self._db.execute("UPDATE callbacks SET due = ? WHERE seq = ? AND due IS NULL",
                                 (time.time(), record.seq))
        else:
            self._save(record)

    def _save(self, record: Record) -> None:
        self._db.execute(  # one statement: a transaction of its own
            "UPDATE functions SET status = ?, record = ?, stdout = ?, stderr = ? WHERE seq = ?",
            (record.status, _dump(record), record.stdout, record.stderr, record.seq))

    def replace_spec(self, record: Record, spec: bytes | str, callback: str | None = None
                     ) -> None:
        """A new spec for a pending function, the record that summarizes it, and its new
        callback target (None: none)."""
        with self._transaction():
            self._db.execute("UPDATE specs SET spec = ? WHERE seq = ?", (spec, record.seq))
            self._db.execute("UPDATE functions SET record = ? WHERE seq = ?",
                             (_dump(record), record.seq))
            self._db.execute("DELETE FROM callbacks WHERE seq = ?", (record.seq,))
            if callback is not None:
                self._db.execute("INSERT INTO callbacks (seq, target) VALUES (?, ?)",
                                 (record.seq, callback))

    # -- callbacks ----------------------------------------------------------------------------

    def due_callbacks(self, now: float, limit: int) -> tuple[list[tuple[int, str, int]],
                                                             float | None]:
        """Callbacks due by ``now`` (seq, target, attempts so far), oldest due first, and
        when the next one not yet due will be."""
        rows = self._db.execute(
            "SELECT seq, target, attempts FROM callbacks WHERE due <= ? ORDER BY due LIMIT ?",
            (now, limit)).fetchall()
        after = self._db.execute("SELECT MIN(due) FROM callbacks WHERE due > ?",
                                 (now,)).fetchone()[0]
        return rows, after

    def by_seq(self, seq: int) -> Record | None:
        row = self._db.execute(f"{_SELECT} WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else _load(row)

    def callback_attempted(self, record: Record, due: float | None) -> None:
        """Save the record with its callback's outcome: due again at ``due``, or done
        (delivered or failed) when None."""
        with self._transaction():
            self._save(record)
            if due is None:
                self._db.execute("DELETE FROM callbacks WHERE seq = ?", (record.seq,))
            else:
                self._db.execute("UPDATE callbacks SET due = ?, attempts = attempts + 1 "
                                 "WHERE seq = ?", (due, record.seq))

    def get(self, fid: str) -> Record | None:
        row = self._db.execute(f"{_SELECT} WHERE id = ?", (fid,)).fetchone()
        return None if row is None else _load(row)

    def spec(self, fid: str) -> bytes | None:
        """The spec as sent (JSON), or None for an unknown id."""
        row = self._db.execute(
            "SELECT s.spec FROM specs s JOIN functions f ON f.seq = s.seq WHERE f.id = ?",
            (fid,)).fetchone()
        if row is None:
            return None
        value = row[0]
        return value.encode() if isinstance(value, str) else value

    def records(self, statuses: tuple[str, ...] | None = ACTIVE, limit: int = 100,
                before: int | None = None) -> Iterator[Record]:
        """Newest first; ``statuses`` None means all, ``before`` a seq."""
        where: list[str] = []
        args: list[str | int] = []
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(f"{_SELECT}{clause} ORDER BY seq DESC LIMIT ?",
                                (*args, limit))
        return (_load(r) for r in rows.fetchall())

    def seq(self, fid: str) -> int | None:
        row = self._db.execute("SELECT seq FROM functions WHERE id = ?", (fid,)).fetchone()
        return row[0] if row else None

    def count(self, status: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM functions WHERE status = ?",
                                (status,)).fetchone()[0]

    def delete(self, fid: str) -> bool:
        seq = self.seq(fid)
        if seq is None:
            return False
        with self._transaction():
            for table in ("callbacks", "specs", "functions"):
                self._db.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
        return True

    def recover(self) -> list[Record]:
        """After a crash: end running functions as interrupted; return pending, oldest first."""
        now = time.time()
        for record in list(self.records(("running",), limit=-1)):
            record.status = "error"
            record.error = INTERRUPTED
            record.finished_at = now
            self.save(record)  # its callback, if any, is due now
        return sorted(self.records(("pending",), limit=-1), key=lambda r: r.seq or 0)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _dump(record: Record) -> str:
    # vars(), not asdict(): asdict deep-copies. The output has columns of its own.
    data = dict(vars(record))
    del data["seq"], data["stdout"], data["stderr"]
    return _dumps(data)


def _load(row: tuple[int, str, str, str]) -> Record:
    data = json.loads(row[1])
    record = Record(**{k: v for k, v in data.items() if k in _FIELDS})
    record.seq, record.stdout, record.stderr = row[0], row[2], row[3]
    return record
