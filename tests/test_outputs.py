"""Output files: collected from the working directory when a function ends, on both run
paths (agent and exec), within their caps, and never through a symlink."""

from __future__ import annotations

import hashlib

import pytest
import trio
from test_pool import run, serving

from pool import BadFile, Job, Outputs, check_pattern, output_matches


@pytest.fixture(params=["python", "busybox"])
def image(request, images):
    return getattr(images, request.param)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_patterns_match_part_by_part():
    cases = [("a.txt", "*.txt", True), ("d/a.txt", "*.txt", False),
             ("d/a.txt", "**/*.txt", True), ("a.txt", "**/*.txt", True),
             ("out/x.csv", "out/*.csv", True), ("out/y/x.csv", "out/*.csv", False),
             ("a/b/c/d", "a/**/d", True), ("a/d", "a/**/d", True), ("a/b/e", "a/**/d", False),
             ("result.png", "result.png", True), ("result.png.bak", "result.png", False),
             ("x1", "x?", True), ("x12", "x?", False), ("[a]", "[[]a]", True)]
    for path, pattern, expected in cases:
        assert output_matches(path, pattern) is expected, (path, pattern)
    # Many ** cost parts times pattern, not a combinatorial search.
    assert not output_matches("/".join("a" * 300), "/".join(["**", "a"] * 100) + "/b")


def test_bad_patterns_refused():
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./x", "a/./b", "a\x00",
                "x" * 2000):
        with pytest.raises(BadFile):
            check_pattern(bad)
    assert check_pattern("out/**/*.csv") == "out/**/*.csv"


MAKE = ("mkdir -p out/deep/er skip && printf 'a,b\\n' > out/one.csv && "
        "printf '1\\n' > out/deep/er/two.csv && : > out/empty.csv && "
        "printf 'png' > result.png && printf 'no' > skip/x.csv && "
        "printf 'no' > out/notes.txt && "
        "head -c 3000 /dev/urandom > bin.dat")


async def test_files_collected_by_pattern(engine, image, test_id, test_labels):
    outputs = Outputs(("result.png", "out/**/*.csv", "bin.dat", "missing.txt"))
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            lease, result = await run(pool, Job(["sh", "-c", MAKE], outputs=outputs))
            # Collecting takes nothing away: the follow-up finds them all.
            _, after = await run(pool, Job(["sh", "-c", "cat out/one.csv bin.dat | wc -c"]),
                                 near=result.place)
    assert result.exit_code == 0, result.stderr
    paths = [f.path for f in result.files]
    assert paths == ["bin.dat", "out/deep/er/two.csv", "out/empty.csv", "out/one.csv",
                     "result.png"]
    got = {f.path: f for f in result.files}
    assert got["out/one.csv"].data == b"a,b\n" and got["out/deep/er/two.csv"].data == b"1\n"
    assert got["out/empty.csv"].data == b"" and got["out/empty.csv"].size == 0
    assert got["result.png"].sha256 == sha(b"png")
    assert got["bin.dat"].size == 3000 and got["bin.dat"].sha256 == sha(got["bin.dat"].data)
    assert not any(f.truncated for f in result.files) and not result.files_truncated
    assert result.files_error is None
    assert after.stdout.strip() == b"3004"


async def test_no_symlink_or_special_file_is_followed(engine, image, test_id, test_labels):
    script = ("ln -s /etc/passwd passwd.txt && mkdir real && printf ok > real/a.txt && "
              "ln -s /etc linked && ln -s real alias && mkfifo pipe.txt && "
              "printf mine > mine.txt")
    outputs = Outputs(("*.txt", "linked/*", "alias/*", "real/*"))
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            _, result = await run(pool, Job(["sh", "-c", script], outputs=outputs))
    assert result.exit_code == 0, result.stderr
    assert [(f.path, f.data) for f in result.files] == [("mine.txt", b"mine"),
                                                       ("real/a.txt", b"ok")]


async def test_caps_cut_and_say_so(engine, image, test_id, test_labels):
    script = ("head -c 5000 /dev/zero > a.bin && head -c 100 /dev/zero > b.bin && "
              "head -c 3000 /dev/zero > c.bin && head -c 10 /dev/zero > d.bin && "
              "for i in 1 2 3 4 5; do : > n$i.log; done")
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            # Each file at most 4000 bytes, 6000 in all: a is cut, b whole, c gets what is
            # left, and d finds no room.
            _, capped = await run(pool, Job(["sh", "-c", script], outputs=Outputs(
                ("*.bin",), max_file=4000, max_total=6000)))
            _, counted = await run(pool, Job(["true"], outputs=Outputs(
                ("*.log",), max_count=3)), near=capped.place)
    sizes = [(f.path, f.size, f.truncated) for f in capped.files]
    assert sizes == [("a.bin", 4000, True), ("b.bin", 100, False), ("c.bin", 1900, True)]
    assert capped.files[0].sha256 == sha(bytes(4000))
    assert capped.files_truncated
    assert [f.path for f in counted.files] == ["n1.log", "n2.log", "n3.log"]
    assert counted.files_truncated


async def test_a_timed_out_function_leaves_its_partial_files(engine, image, test_id,
                                                            test_labels):
    job = Job(["sh", "-c", "echo partial > progress.txt; sleep 30"], timeout=1.0,
              outputs=Outputs(("progress.txt",)))
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            _, result = await run(pool, job)
    assert result.outcome == "timeout"
    assert [(f.path, f.data) for f in result.files] == [("progress.txt", b"partial\n")]


async def test_files_stream_to_a_sink(engine, image, test_id, test_labels):
    pieces: dict[str, list[bytes]] = {}

    async def on_file(path: str, chunk: bytes) -> None:
        pieces.setdefault(path, []).append(chunk)
        await trio.lowlevel.checkpoint()

    size = (1 << 20) + 1
    job = Job(["sh", "-c", f"head -c {size} /dev/urandom > big.bin && : > zero.bin"],
              outputs=Outputs(("*.bin",)))
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            async with pool.lease() as lease:
                result = await lease.run(job, on_file=on_file)
    big, zero = result.files
    assert (big.path, big.size, zero.path, zero.size) == ("big.bin", size, "zero.bin", 0)
    assert big.data is None  # it went to the sink only
    data = b"".join(pieces["big.bin"])
    assert len(data) == size and sha(data) == big.sha256
    assert pieces["zero.bin"] == [b""]
    if pool.mode == "agent":
        assert len(pieces["big.bin"]) > 2  # it came in pieces, not at once
