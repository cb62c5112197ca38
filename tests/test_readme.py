"""README.rst stays true: its walkthrough runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import trio

README = Path(__file__).resolve().parent.parent / "README.rst"


def walkthrough() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each ``$`` line of the Walkthrough block."""
    text = README.read_text()
    section = text.split("Walkthrough\n-----------\n", 1)[1]
    block = section.split("::\n\n", 1)[1]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        line = line[4:]
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line and steps:
            steps[-1][1].append(line)
    return steps


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert "    pip install .\n    ufaas\n" in text
    assert "    tox\n" in text


async def test_walkthrough_runs_as_written(start_server, make_config, images, tmp_path):
    steps = walkthrough()
    assert len(steps) >= 5
    with trio.fail_after(90):
        client = await start_server(make_config())
        url = str(client.base_url).rstrip("/")
        script = ["set -e"]
        for i, (command, _) in enumerate(steps):
            command = command.replace("http://127.0.0.1:8000", url)
            command = command.replace("python:3.12-slim", images.python)
            script += [f"echo '@@@ {i}'", command]
        result = await trio.run_process(["bash", "-c", "\n".join(script)], cwd=tmp_path,
                                        capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    chunks = re.split(r"^@@@ \d+\n", out, flags=re.M)[1:]
    assert len(chunks) == len(steps)
    for (command, expected), got in zip(steps, chunks, strict=True):
        assert got.splitlines() == expected, command
