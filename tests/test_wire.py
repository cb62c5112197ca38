"""The front-node protocol's messages, without a transport: values travel whole (bytes
too), fields added to the pool's dataclasses travel unchanged, and anything a peer could
send to break it is refused before it is used."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
import trio

from pool import File, Job, Place, PoolStatistics, Profile, Result
from ufaas import wire


def roundtrip(value):
    parts: list[bytes] = []
    header = {"op": "x", "v": wire.encode(value, parts)}
    got, got_parts = wire.unpack(wire.pack(header, parts))
    return wire.decode(got["v"], got_parts)


def test_a_job_travels_whole():
    job = Job(["python3", "main.py"], files=[File("main.py", b"print(1)\n", 0o755),
                                             File("data.bin", bytes(range(256))),
                                             File("empty", b"")],
              env={"$b": "not a tag", "$m": "nor this", "K": "é"}, stdin=b"\x00\xff",
              timeout=math.inf, output_cap=12345, id="f1", fresh=True)
    assert roundtrip(job) == job


def test_a_result_and_what_nodes_report_travel_whole():
    result = Result("exited", exit_code=3, signal=None, duration_ms=1.5, stdout=b"\xfe",
                    truncated=True, place=Place("c" * 64, "w1", "node-a"), forked=True,
                    max_rss=1 << 40)
    assert roundtrip(result) == result
    profile = Profile(memory=64 << 20, preload=("json", "re"))
    assert roundtrip(profile) == profile and isinstance(roundtrip(profile).preload, tuple)
    stats = PoolStatistics("sha256:x", "img", "agent", 1, 2, 0, 3, 0, 5, 0, None,
                           zygote={"failed": {"m": "why"}, "ready": 1})
    assert roundtrip({"pools": [stats], "n": (1, [2])}) == {"pools": [stats], "n": (1, [2])}


def test_a_field_added_later_travels_and_changes_the_schema(monkeypatch):
    @dataclasses.dataclass
    class Later:
        a: int
        blob: bytes = b""
        nested: Place | None = None

    before = wire.schema(dict(wire.TYPES))
    monkeypatch.setitem(wire.TYPES, "Later", Later)
    value = Later(1, b"\x00" * 70000, Place("c", "w"))
    assert roundtrip(value) == value
    assert wire.schema(wire.TYPES) != before


def test_a_pools_counters_travel_alone():
    stats = PoolStatistics("sha256:x", "img", "agent", 1, 2, 0, 3, 0, 5, 0, "why",
                           retired={"idle": 2})
    moved = wire.with_counts(stats, [0, 3, 0, 3, 1, 6])
    assert (moved.idle, moved.busy, moved.waiting, moved.started) == (0, 3, 1, 6)
    assert (moved.last_error, moved.retired) == ("why", {"idle": 2})  # the rest stays
    assert wire.with_counts(stats, wire.counts(stats)) == stats
    for bad in ([1, 2, 3], [0, 0, 0, 0, 0, -1], [0, 0, 0, 0, 0, True], "123456", None):
        with pytest.raises(wire.WireError):
            wire.with_counts(stats, bad)


def test_the_handshake_says_what_differs():
    ours = wire.speaks()
    assert wire.mismatch(ours, ours, we="node", they="front") is None
    other = f"{wire.PROTOCOL + 1} {wire.SCHEMA} 9.9"
    said = wire.mismatch(ours, other, we="node", they="front")
    assert said is not None and "version mismatch" in said
    assert f"the front protocol {wire.PROTOCOL + 1}" in said and "ufaas 9.9" in said
    newer_fields = wire.mismatch(ours, f"{wire.PROTOCOL} abcdef012345 0.1.0", we="front",
                                 they="node")
    assert newer_fields is not None and "schema abcdef012345" in newer_fields
    assert "unknown protocol" in (wire.mismatch(ours, "", we="node", they="front") or "")


@pytest.mark.parametrize("data", [
    b"", b"\x00\x00", "text", struct.pack(">I", 100) + b"{}",
    struct.pack(">I", 2) + b"{}", struct.pack(">I", 4) + b"[1,]",
    struct.pack(">I", 11) + b'{"op":"x"}' + b"extra",
    struct.pack(">I", 24) + b'{"op":"x","parts":[-1] }',
], ids=["empty", "short", "text", "header-beyond", "no-op", "not-json", "unclaimed-bytes",
        "negative-part"])
def test_malformed_messages_are_refused(data):
    with pytest.raises(wire.WireError):
        wire.unpack(data)


@pytest.mark.parametrize("value", [
    {"$d": "Engine", "v": {}}, {"$d": "Job", "v": {"argv": [], "rootkit": 1}},
    {"$d": "Profile", "v": {"memory": 1}}, {"$b": 5}, {"$b": "0"}, {"plain": "dict"},
    {"$d": "Job"}, {"$t": 1},
], ids=["unknown-type", "unknown-field", "profile-that-cannot-be", "missing-part",
        "odd-part", "untagged", "no-fields", "bad-tuple"])
def test_values_no_end_would_send_are_refused(value):
    with pytest.raises(wire.WireError):
        wire.decode(value, [b"only one"])


def test_nesting_past_the_recursion_limit_is_refused():
    value: object = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(wire.WireError):
        wire.decode(value, [])
    head = ("[" * 100000 + "]" * 100000).encode()
    with pytest.raises(wire.WireError):
        wire.unpack(struct.pack(">I", len(head)) + head)


def test_only_the_protocols_types_are_sent():
    @dataclasses.dataclass
    class Secret:
        key: str

    with pytest.raises(TypeError):
        wire.encode(Secret("x"), [])
    with pytest.raises(TypeError):
        wire.encode({1: "int key"}, [])
    with pytest.raises(TypeError):
        wire.encode(object(), [])


async def test_a_window_bounds_what_the_receiver_holds():
    acked: list[int] = []
    inbox = wire.Inbox(10, acked.append)
    inbox.put(b"12345")
    inbox.put(b"67890")
    with pytest.raises(wire.WireError):
        inbox.put(b"x")  # the sender did not wait for room
    assert await inbox.receive() == b"12345" and acked == [5]
    inbox.put(b"abc")
    inbox.end()
    assert [chunk async for chunk in inbox] == [b"67890", b"abc"]

    credit = wire.Credit(10)
    await credit.take(8)
    with trio.move_on_after(0.05) as waited:
        await credit.take(8)
    assert waited.cancelled_caught  # no room until the receiver says so
    credit.give(8)
    with trio.fail_after(1):
        await credit.take(8)
    with pytest.raises(wire.WireError):
        credit.give(9)  # more than was ever sent


def ops(data: bytes) -> list[str]:
    return [header["op"] for header, _ in wire.messages(data)]


async def test_what_is_queued_together_goes_as_one_message_in_order():
    outbox = wire.Outbox()
    for op in ("a", "b", "c"):
        outbox.put(wire.message(op))
    assert ops(await outbox.next()) == ["a", "b", "c"]
    outbox.put(wire.message("alone"))
    data = await outbox.next()
    assert wire.unpack(data)[0]["op"] == "alone"  # one message goes as itself
    big = b"x" * wire.BATCH_BYTES
    outbox.put(wire.message("small"))
    outbox.put(wire.pack({"op": "big"}, [big]))
    outbox.put(wire.message("after"))
    assert ops(await outbox.next()) == ["small"]  # a batch never grows past BATCH_BYTES
    assert ops(await outbox.next()) == ["big"]
    assert ops(await outbox.next()) == ["after"]
    outbox.close()
    assert await outbox.next() is None


async def test_a_later_message_goes_with_the_next_one_made_as_it_goes(autojump_clock):
    outbox = wire.Outbox()
    state = ["first"]
    outbox.later("pool", lambda: wire.message("view", said=state[0]))
    outbox.later("lease", lambda: wire.message("release"))
    outbox.later("pool", lambda: wire.message("view", said=state[0]))  # one per key
    state[0] = "now"
    outbox.put(wire.message("run"))
    got = wire.messages(await outbox.next())
    assert [h["op"] for h, _ in got] == ["view", "release", "run"]  # before what follows
    assert got[0][0]["said"] == "now"
    start = trio.current_time()
    outbox.later("pool", lambda: wire.message("view"))
    assert ops(await outbox.next()) == ["view"]  # alone, once it has waited LATER
    assert trio.current_time() - start == pytest.approx(wire.LATER)


async def test_a_later_message_may_find_nothing_to_say(autojump_clock):
    outbox = wire.Outbox()
    outbox.later("view", lambda: None)  # nothing new by the time it goes
    outbox.put(wire.message("run"))
    assert ops(await outbox.next()) == ["run"]
    outbox.later("view", lambda: None)
    with trio.move_on_after(1) as waited:
        await outbox.next()  # nothing to send: it waits on past LATER
    assert waited.cancelled_caught


async def test_later_messages_keep_to_the_batch_size_and_their_order():
    """Large later messages (held output) wait for the next batch like any other, and
    go before what is queued or made later still: a run's output keeps its order."""
    outbox = wire.Outbox()
    half = b"x" * (wire.BATCH_BYTES // 2 + 1)
    outbox.later("a", lambda: wire.pack({"op": "out", "n": 1}, [half]))
    outbox.later("b", lambda: wire.pack({"op": "out", "n": 2}, [half]))
    outbox.put(wire.message("result"))
    assert ops(await outbox.next()) == ["out"]
    outbox.later("a", lambda: wire.pack({"op": "out", "n": 3}, [b"after"]))
    outbox.put(wire.message("next"))
    got = [h.get("n", h["op"]) for h, _ in wire.messages(await outbox.next())]
    assert got == [2, "result", 3, "next"]


async def test_a_nodes_later_messages_go_after_what_was_queued_before_them():
    """A node's views say what is true after everything it queued: they go last, so the
    front never reads older counters after newer ones."""
    outbox = wire.Outbox(later_last=True)
    outbox.put(wire.message("beat"))
    outbox.put(wire.message("leased"))
    outbox.later("pool", lambda: wire.message("view"))
    assert ops(await outbox.next()) == ["beat", "leased", "view"]


def test_a_batch_holds_messages_not_batches():
    inner = wire.pack({"op": "many"}, [wire.message("a"), wire.message("b")])
    assert ops(inner) == ["a", "b"]
    with pytest.raises(wire.WireError):
        wire.messages(wire.pack({"op": "many"}, [inner]))
    with pytest.raises(wire.WireError):
        wire.messages(wire.pack({"op": "many"}, [b"not a message"]))
