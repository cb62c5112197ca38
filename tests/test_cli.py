"""``ufaas run|ls|show|cancel`` as real subprocesses, and the Python clients, against the
real server on port 0."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import trio
from command import ufaas_command

import ufaas
from ufaas.client import Client, ClientError, SyncClient

ROOT = Path(__file__).resolve().parent.parent


def environ(client, token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "UFAAS_URL": str(client.base_url).rstrip("/"),
           "PYTHONPATH": str(ROOT)}
    env.pop("UFAAS_TOKEN", None)
    if token:
        env["UFAAS_TOKEN"] = token
    return env


async def ufaas_cli(client, *args: str, token: str | None = None, stdin: bytes = b"",
                    cwd: Path | None = None) -> subprocess.CompletedProcess:
    return await trio.run_process([*ufaas_command(), *args], stdin=stdin, check=False,
                                  capture_stdout=True, capture_stderr=True,
                                  env=environ(client, token), cwd=cwd)


async def test_run_streams_live_and_exits_with_the_code(start_server, python_config, images):
    code = ("import sys, time; print('a'); time.sleep(2); print('b'); "
            "print('oops', file=sys.stderr); sys.exit(3)")
    with trio.fail_after(60):
        client = await start_server(python_config())
        process = await trio.lowlevel.open_process(
            [*ufaas_command(), "run", images.python, "--", "python3", "-u", "-c", code],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=environ(client))
        chunks: list[tuple[float, bytes]] = []
        errors = bytearray()

        async def read_errors():
            async for data in process.stderr:
                errors.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_errors)
            async for data in process.stdout:
                chunks.append((time.monotonic(), data))
        code_ = await process.wait()
        ended = time.monotonic()
    assert b"".join(d for _, d in chunks) == b"a\nb\n"
    first_line = next(t for i, (t, _) in enumerate(chunks)
                      if b"".join(d for _, d in chunks[:i + 1]) == b"a\n")
    assert ended - first_line >= 1.5
    assert errors == b"oops\n"
    assert code_ == 3


async def test_stdin_is_forwarded(start_server, python_config, images):
    with trio.fail_after(60):
        client = await start_server(python_config())
        for image in (images.busybox, images.python):
            command = shlex.join([*ufaas_command(), "run", image, "--", "cat"])
            result = await trio.run_process(["bash", "-c", f"echo data | {command}"],
                                            capture_stdout=True, capture_stderr=True,
                                            check=False, env=environ(client))
            assert (result.returncode, result.stdout, result.stderr) == (0, b"data\n", b"")
        # More than the server queues for a function: it must wait, not fail.
        big = b"x" * (3 << 20)
        result = await ufaas_cli(client, "run", images.python, "--", "wc", "-c", stdin=big)
        assert result.stdout.split() == [str(len(big)).encode()], result


async def test_files_env_and_the_other_commands(start_server, python_config, images,
                                                tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "main.py").write_text("import os\nprint(open('data.bin', 'rb')"
                                              ".read(), os.environ['NAME'])\n")
    (tmp_path / "data.bin").write_bytes(b"\x00\xff")
    with trio.fail_after(60):
        client = await start_server(python_config(token="t0k"), token="t0k")
        result = await ufaas_cli(client, "run", images.python, "-f", "lib/main.py",
                                 "-f", str(tmp_path / "data.bin"), "-e", "NAME=v=1", "--",
                                 "python3", "lib/main.py", token="t0k", cwd=tmp_path)
        assert (result.returncode, result.stdout) == (0, b"b'\\x00\\xff' v=1\n"), result
        # The first "--" ends our options; a later one belongs to the command.
        result = await ufaas_cli(client, "run", images.python, "--", "echo", "--", "-x",
                                 token="t0k")
        assert result.stdout == b"-- -x\n"
        result = await ufaas_cli(client, "run", images.python, "--timeout", "1", "--",
                                 "sleep", "10", token="t0k")
        assert result.returncode == 124 and b"timeout" in result.stderr
        result = await ufaas_cli(client, "run", images.python, "--", "true")
        assert result.returncode == 125 and b"401" in result.stderr

        fid = (await client.post("/fn", json={"image": images.python,
                                              "command": "sleep 30"})).json()["id"]
        listed = await ufaas_cli(client, "ls", token="t0k")
        assert listed.returncode == 0 and fid in listed.stdout.decode()
        cancelled = await ufaas_cli(client, "cancel", fid, token="t0k")
        assert cancelled.stdout == b"cancelled\n"
        shown = await ufaas_cli(client, "show", fid, token="t0k")
        assert json.loads(shown.stdout)["status"] == "cancelled"
        missing = await ufaas_cli(client, "show", "nope", token="t0k")
        assert missing.returncode == 1 and b"404" in missing.stderr


async def test_python_clients(start_server, python_config, images):
    assert {"Client", "ClientError", "SyncClient"} <= set(ufaas.__all__)
    with trio.fail_after(60):
        http = await start_server(python_config())
        url = str(http.base_url)
        client = Client(url)
        out: list[str] = []

        async def lines():
            yield "one\n"
            yield "two\n"

        end = await client.run({"image": images.python, "command": ["cat"]}, stdin=lines(),
                               stdout=out.append)
        assert end["status"] == "succeeded" and "".join(out) == "one\ntwo\n"
        record = await client.create({"image": images.python, "command": "echo hi"}, wait=20)
        assert record["stdout"] == "hi\n"
        with pytest.raises(ClientError) as bad:
            await client.create({"command": "true"})
        assert bad.value.status == 422 and "image" in bad.value.message
        with pytest.raises(ClientError) as bad:
            await client.run({"command": "true"})
        assert "image" in bad.value.message

        sync = SyncClient(url)
        got = await trio.to_thread.run_sync(lambda: sync.get(record["id"]))
        assert got["stdout"] == "hi\n"
        errors: list[str] = []
        end = await trio.to_thread.run_sync(lambda: sync.run(
            {"image": images.python, "command": "cat >&2; exit 4"}, stdin="to stderr",
            stderr=errors.append))
        assert end["exit_code"] == 4 and "".join(errors) == "to stderr"


async def test_client_catches_up_after_missing_output(start_server, python_config, images):
    lines = 500_000  # 4 MB: past the socket buffers and the watcher bound
    code = ("import sys; print('start', flush=True); w = sys.stdout.write\n"
            f"for i in range(0, {lines}, 1000):\n"
            "    w(''.join(f'{j:07d}\\n' for j in range(i, i + 1000)))\n")
    expected = "start\n" + "".join(f"{j:07d}\n" for j in range(lines))
    with trio.fail_after(60):
        http = await start_server(python_config(stream_buffer=65536, output_cap=8 << 20))
        out: list[str] = []

        async def slow_at_first(data):
            out.append(data)
            if len(out) == 1:  # stop reading until the server has dropped some output
                while not any(w["dropped"] for w in (await http.get("/watchers")).json()):
                    await trio.sleep(0.05)

        end = await Client(str(http.base_url)).run(
            {"image": images.python, "command": ["python3", "-c", code]}, stdout=slow_at_first)
    assert end["status"] == "succeeded"
    assert "".join(out) == expected


async def test_run_copies_output_files_here(start_server, python_config, images, tmp_path):
    client = await start_server(python_config())
    script = ("mkdir -p out && printf '1,2\\n' > out/a.csv && printf '3\\n' > out/b.csv && "
              "printf 'png' > chart.png && printf 'no' > skipped.txt")
    result = await ufaas_cli(client, "run", "-o", "chart.png", "-o", "out/*.csv",
                             images.busybox, "--", "sh", "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "chart.png").read_bytes() == b"png"
    assert (tmp_path / "out" / "a.csv").read_bytes() == b"1,2\n"
    assert (tmp_path / "out" / "b.csv").read_bytes() == b"3\n"
    assert not (tmp_path / "skipped.txt").exists()
    # Cut files are said to be so.
    result = await ufaas_cli(client, "run", "-o", "big.bin", images.python, "--", "sh", "-c",
                             f"head -c {(8 << 20) + 1} /dev/zero > big.bin", cwd=tmp_path)
    assert result.returncode == 0 and b"cut" in result.stderr, result.stderr
    assert (tmp_path / "big.bin").stat().st_size == 8 << 20


async def test_clients_save_output_files(start_server, python_config, images, tmp_path):
    client = await start_server(python_config())
    url = str(client.base_url).rstrip("/")
    spec = {"image": images.python, "command": "mkdir d && echo hi > d/x.txt",
            "outputs": ["d/x.txt"]}
    async with Client(url) as ours:
        record = await ours.create(spec, wait=60)
        written = await ours.save_files(record["id"], tmp_path / "async")
    assert written == [str(tmp_path / "async" / "d" / "x.txt")]
    assert (tmp_path / "async" / "d" / "x.txt").read_bytes() == b"hi\n"
    def blocking():  # in a thread: the server shares this test's event loop
        with SyncClient(url) as sync:
            assert sync.save_files(record["id"], tmp_path / "sync") == [
                str(tmp_path / "sync" / "d" / "x.txt")]
            # A listed path that would leave the directory is refused, not written.
            with pytest.raises(ClientError, match="outside"):
                sync.save_files(record["id"], tmp_path, [{"path": "../evil"}])

    await trio.to_thread.run_sync(blocking)
    assert (tmp_path / "sync" / "d" / "x.txt").read_bytes() == b"hi\n"
