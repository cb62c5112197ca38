"""What the project promises about itself: its public names, its documented settings, and the
pool library standing on its own."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import pool
import ufaas
from ufaas.config import ClusterConfig, Config, PoolConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", [pool, ufaas], ids=["pool", "ufaas"])
def test_every_public_name_is_exported(package):
    """``__all__`` lists exactly what the package offers: no public name is left out of it,
    and nothing in it is missing."""
    public = {name for name, value in vars(package).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and name != "annotations"}
    assert set(package.__all__) == public | {"__version__"} & set(package.__all__)
    for name in package.__all__:
        assert hasattr(package, name), name


def _readme_names() -> set[str]:
    text = (ROOT / "README.rst").read_text()
    return set(re.findall(r"``([a-z_]+)``", text))


@pytest.mark.parametrize("model", [Config, PoolConfig, ClusterConfig])
def test_every_setting_is_documented(model):
    documented = _readme_names()
    missing = sorted(set(model.model_fields) - documented)
    assert missing == [], f"settings missing from README.rst: {missing}"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


FORBIDDEN_IN_POOL = {"ufaas", "pydantic", "quart", "quart_trio", "quart_schema", "hypercorn",
                     "httpx", "prometheus_client"}


def test_pool_imports_nothing_of_the_service():
    for path in sorted((ROOT / "pool").glob("*.py")):
        assert not _imports(path) & FORBIDDEN_IN_POOL, path.name
    # And at run time, nothing drags them in indirectly.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pool; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert not {name.split(".")[0] for name in loaded} & FORBIDDEN_IN_POOL


def test_the_server_loads_no_command_line_client_of_httpx():
    """httpx imports its command line client (rich, pygments) when they are installed, as
    they are here (schemathesis brings them): the server leaves it out, and httpx works."""
    import importlib.util

    assert importlib.util.find_spec("rich") is not None  # else this proves nothing
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ufaas.server, httpx; httpx.URL('http://x/');"
         "print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert "httpx" in loaded
    assert not {name.split(".")[0] for name in loaded} & {"rich", "pygments"}


def test_the_agent_stands_alone():
    """The agent travels into containers as source text: the standard library only."""
    stdlib = sys.stdlib_module_names
    assert _imports(ROOT / "pool" / "_agent.py") <= set(stdlib)
