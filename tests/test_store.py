"""The record store on a real SQLite file: its schema, and databases of earlier versions."""

from __future__ import annotations

import json
import sqlite3

from ufaas.store import Record, Store

# The schema before specs had a table of their own (user_version 0).
SCHEMA_V0 = """
CREATE TABLE functions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX functions_status ON functions (status, seq);
"""


def test_records_round_trip_and_updates_leave_the_spec(tmp_path):
    store = Store(tmp_path / "s.db")
    spec = {"image": "i", "command": ["true"], "stdin": "x" * 100_000}
    record = store.insert(Record(id="a", spec=spec))
    record.status, record.stdout = "succeeded", "out"
    store.save(record)
    got = store.get("a")
    assert got is not None and got.spec == spec and got.stdout == "out"
    assert got.status == "succeeded" and got.seq == record.seq
    record.spec = {"image": "j", "command": ["false"]}
    store.save(record, spec=True)
    assert store.get("a").spec == record.spec  # type: ignore[union-attr]
    assert [r.id for r in store.list(None)] == ["a"]
    assert store.delete("a") and store.get("a") is None
    assert store._db.execute("SELECT COUNT(*) FROM specs").fetchone()[0] == 0
    store.close()


def test_a_version_0_database_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V0)
    old = [("p", "pending", {"image": "i", "command": "echo p"}),
           ("s", "succeeded", {"image": "i", "command": "echo s"})]
    for fid, status, spec in old:
        record = {"id": fid, "status": status, "stdout": fid}
        db.execute("INSERT INTO functions (id, status, spec, record) VALUES (?, ?, ?, ?)",
                   (fid, status, json.dumps(spec), json.dumps(record)))
    db.commit()
    db.close()

    store = Store(path)
    assert [(r.id, r.status, r.spec) for r in store.list(None)] == [
        (fid, status, spec) for fid, status, spec in reversed(old)]
    assert [r.id for r in store.recover()] == ["p"]
    new = store.insert(Record(id="n", spec={"image": "i", "command": "true"}))
    assert new.seq == 3
    store.close()
    # Opening it again finds the new schema and changes nothing.
    store = Store(path)
    assert [r.id for r in store.list(None)] == ["n", "s", "p"]
    assert store.get("s").stdout == "s"  # type: ignore[union-attr]
    columns = {row[1] for row in store._db.execute("PRAGMA table_info(functions)")}
    assert "spec" not in columns
    store.close()
