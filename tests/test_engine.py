"""The test environment itself: the engine runs the test images, and the CLI is installed."""

from __future__ import annotations

import json
import subprocess

import pytest
from command import ufaas_command


@pytest.fixture(params=["busybox", "python"])
def container(request, docker_client, images, test_labels):
    # Imported images have no CMD.
    container = docker_client.containers.create(
        getattr(images, request.param), ["sleep", "60"], labels=test_labels
    )
    container.start()
    return container


def test_exec_echo(container):
    result = container.exec_run(["echo", "hi"])
    assert result.exit_code == 0
    assert result.output == b"hi\n"


def test_python_image_has_stdlib(docker_client, images, test_labels):
    container = docker_client.containers.create(images.python, ["sleep", "60"], labels=test_labels)
    container.start()
    result = container.exec_run(
        ["python3", "-c", "import json, sys; print(json.dumps(sys.version_info[:2]))"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0] == 3


def test_cli_help():
    result = subprocess.run(
        [*ufaas_command(), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--db", "--config", "--token", "--insecure"):
        assert option in result.stdout
