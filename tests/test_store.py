"""The record store on a real SQLite file: its schema, and databases of earlier versions."""

from __future__ import annotations

import json
import sqlite3

from ufaas.spec import summarize
from ufaas.store import INTERRUPTED, Record, Store

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
# Version 1: the spec in a table of its own, the output still inside each record.
SCHEMA_V1 = """
CREATE TABLE functions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX functions_status ON functions (status, seq);
CREATE TABLE specs (seq INTEGER PRIMARY KEY, spec TEXT NOT NULL);
PRAGMA user_version = 1;
"""
SPEC = {"image": "i", "command": ["true"], "stdin": "x" * 100_000}


def test_records_round_trip_and_the_big_parts_have_tables_of_their_own(tmp_path):
    store = Store(tmp_path / "s.db")
    summary = {"image": "i", "command": ["true"]}
    record = store.insert(Record(id="a", spec=summary), json.dumps(SPEC))
    assert store.get("a").stdout == ""  # type: ignore[union-attr]
    record.status, record.stdout, record.stderr = "succeeded", "out", "err"
    store.save(record)
    got = store.get("a")
    assert got is not None and got.spec == summary and (got.stdout, got.stderr) == ("out", "err")
    assert got.status == "succeeded" and got.seq == record.seq
    assert json.loads(store.spec("a") or b"") == SPEC
    # The row a listing reads holds the record and its output, never the spec as sent.
    (row,) = store._db.execute("SELECT record FROM functions").fetchone()
    assert "out" not in json.loads(row).values() and "x" * 100 not in row
    (listed,) = store.records(None)
    assert listed.id == "a" and listed.stdout == "out" and listed.spec == summary
    store.replace_spec(record, json.dumps({"image": "j", "command": ["false"]}))
    assert json.loads(store.spec("a") or b"")["image"] == "j"
    assert store.delete("a") and store.get("a") is None and store.spec("a") is None
    for table in ("specs", "functions"):
        assert store._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    store.close()


def test_listing_pages_and_recovery(tmp_path):
    store = Store(tmp_path / "s.db")
    for i in range(5):
        store.insert(Record(id=f"f{i}", spec={}, status="running" if i == 1 else "pending"),
                     "{}")
    assert [r.id for r in store.records(None, limit=2)] == ["f4", "f3"]
    assert [r.id for r in store.records(None, limit=2, before=store.seq("f3"))] == ["f2", "f1"]
    assert [r.id for r in store.recover()] == ["f0", "f2", "f3", "f4"]
    interrupted = store.get("f1")
    assert interrupted is not None and interrupted.status == "error"
    assert interrupted.error == INTERRUPTED
    store.close()


def old_database(path, schema, rows, *, spec_column):
    db = sqlite3.connect(path)
    db.executescript(schema)
    for fid, status, spec in rows:
        record = {"id": fid, "status": status, "stdout": f"{fid} out"}
        if spec_column:
            db.execute("INSERT INTO functions (id, status, spec, record) VALUES (?, ?, ?, ?)",
                       (fid, status, json.dumps(spec), json.dumps(record)))
        else:
            cur = db.execute("INSERT INTO functions (id, status, record) VALUES (?, ?, ?)",
                             (fid, status, json.dumps(record)))
            db.execute("INSERT INTO specs (seq, spec) VALUES (?, ?)",
                       (cur.lastrowid, json.dumps(spec)))
    db.commit()
    db.close()


OLD = [("p", "pending", {"image": "i", "command": "echo p"}),
       ("s", "succeeded", {"image": "i", "command": "echo s",
                           "resources": [{"path": "a", "text": "hello"}]})]


def test_databases_of_version_0_and_1_are_migrated(tmp_path):
    for schema, spec_column in ((SCHEMA_V0, True), (SCHEMA_V1, False)):
        path = tmp_path / f"old-{spec_column}.db"
        old_database(path, schema, OLD, spec_column=spec_column)
        store = Store(path, summarize=summarize)
        listed = list(store.records(None))
        assert [(r.id, r.status) for r in listed] == [("s", "succeeded"), ("p", "pending")]
        assert listed[0].spec["resources"][0]["size"] == 5  # summarized, without content
        assert json.loads(store.spec("s") or b"") == OLD[1][2]
        assert store.get("s").stdout == "s out"  # type: ignore[union-attr]
        assert [r.id for r in store.recover()] == ["p"]
        new = store.insert(Record(id="n", spec={"image": "i"}), "{}")
        assert new.seq == 3
        store.close()
        # Opening it again finds the new schema and changes nothing.
        store = Store(path, summarize=summarize)
        assert [r.id for r in store.records(None)] == ["n", "s", "p"]
        assert store.get("s").stdout == "s out"  # type: ignore[union-attr]
        columns = {row[1] for row in store._db.execute("PRAGMA table_info(functions)")}
        assert "spec" not in columns
        store.close()
