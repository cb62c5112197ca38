"""Fixtures giving tests a real Docker engine, the local test images, labels that let
every container a test creates be found and removed afterwards, the real server on port 0,
and real HTTP sites for URL resources.

Under CI (``CI=true``) a missing engine or image fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import types
import uuid

import docker
import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
import images as test_images  # noqa: E402  (tests/images.py, not a package)
import sites  # noqa: E402

TEST_LABEL = "ufaas.test"
INSTANCE_LABEL = "ufaas.instance"


def _unavailable(reason: str) -> None:
    # CI must not turn a broken engine into a green run of skipped tests.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        _unavailable(f"no reachable Docker engine: {exc}")
    yield client
    client.close()


@pytest.fixture
async def engine(docker_client):
    """The pool library's own access to the engine, for tests of the library."""
    from pool import Engine

    eng = Engine()
    yield eng
    await eng.aclose()


@pytest.fixture(scope="session")
def images(docker_client):
    try:
        test_images.ensure_images()
    except Exception as exc:  # any build failure means the image tests cannot run
        _unavailable(f"cannot build the test images (run `python3 tests/images.py`): {exc}")
    return types.SimpleNamespace(busybox=test_images.BUSYBOX, python=test_images.PYTHON)


@pytest.fixture
def test_id() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def remove_containers_of(docker_client, test_id: str) -> None:
    """Remove every container labelled for ``test_id``, or of a server instance it named."""
    containers = docker_client.containers
    leftovers = containers.list(
        all=True, filters={"label": f"{TEST_LABEL}={test_id}"}, ignore_removed=True
    )
    leftovers += [
        c
        for c in containers.list(all=True, filters={"label": INSTANCE_LABEL}, ignore_removed=True)
        if c.labels.get(INSTANCE_LABEL, "").startswith(test_id)
    ]
    for container in leftovers:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # already gone, e.g. removed by the code under test
        except docker.errors.APIError as exc:
            # Going already (AutoRemove, or the code under test): the engine finishes it.
            if exc.status_code != 409 or "already in progress" not in str(exc):
                raise


@pytest.fixture
def test_labels(docker_client, test_id):
    yield {TEST_LABEL: test_id}
    remove_containers_of(docker_client, test_id)


@pytest.fixture
def make_config(tmp_path, images):
    """Builds a server Config on port 0 with its own database; keywords override."""
    from ufaas.config import Config

    def make(**overrides):
        overrides.setdefault("port", 0)
        overrides.setdefault("db", str(tmp_path / "ufaas.db"))
        return Config.load(None, environ={}, **overrides)

    return make


@pytest.fixture
async def start_server(nursery, test_id, test_labels):
    """Starts the real server in the test's nursery; returns an httpx client bound to it."""
    import httpx

    from ufaas.server import serve

    clients = []

    async def start(config, token=None):
        url = await nursery.start(functools.partial(
            serve, config, instance=f"{test_id}-{len(clients)}", labels=test_labels))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(base_url=url, headers=headers, timeout=60)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()


@pytest.fixture
def python_config(make_config, images):
    """make_config with a warm python pool (min_idle 1, max 2) unless told otherwise."""
    from ufaas.config import PoolConfig

    def make(**kw):
        kw.setdefault("pools", [PoolConfig(image=images.python, min_idle=1, max=2)])
        return make_config(**kw)

    return make


@pytest.fixture
def make_site():
    """Starts a real HTTP server on 127.0.0.1 with the routes given (see tests/sites.py);
    it stops at the test's end."""
    with contextlib.ExitStack() as stack:
        yield lambda routes: stack.enter_context(sites.Site(routes))


@pytest.fixture(scope="module")
def module_labels(docker_client):
    """Like ``test_labels``, for what a whole module shares (a server started once); its
    containers are removed after the module's last test. Instance names start with the
    ``ufaas.test`` label's value."""
    module_id = f"m-{uuid.uuid4().hex[:8]}"
    yield {TEST_LABEL: module_id}
    remove_containers_of(docker_client, module_id)


NODE_TOKEN = "node-token-for-tests"
# Short beats, so that a lost peer is noticed within a test's patience.
NODE_BEATS = {"heartbeat": 0.5, "node_timeout": 3.0}


async def _serve_node(scope, node, *, task_status):
    with scope:
        await node.serve(task_status=task_status)


@pytest.fixture
async def start_node(nursery, test_id, test_labels, images):
    """Starts a real ``ufaas node`` (its NodeServer) on 127.0.0.1 in the test's nursery, on
    the local engine; returns its name, its URL, and ``stop()``, which ends it as a crash
    would (its connections drop, its containers go). Its name is ``name`` and the test's
    id: a node removes at start every container of its name on its engine, and those of
    another test run on the same engine are not its own."""
    from ufaas.config import Config
    from ufaas.node import NodeServer

    async def start(name, *, token=NODE_TOKEN, speaks_as=None, port=0, **settings):
        name = f"{name}-{test_id}"
        cluster = {"listen": "127.0.0.1", "node_port": port, "token": token, "name": name,
                   **NODE_BEATS, **settings.pop("cluster", {})}
        config = Config.load(None, environ={}, cluster=cluster, **settings)
        node = NodeServer(config, speaks_as=speaks_as, labels=test_labels)
        scope = trio.CancelScope()
        port = await nursery.start(_serve_node, scope, node)
        return types.SimpleNamespace(name=name, url=f"ws://127.0.0.1:{port}", port=port,
                                     node=node, stop=scope.cancel)

    return start


@pytest.fixture
def front_config(make_config, images):
    """make_config for a front whose nodes are ``nodes`` (URLs), remote only unless
    ``local`` is given, with a python pool (min_idle 1, max 2 per node) unless told."""
    from ufaas.config import PoolConfig

    def make(nodes, *, local=False, token=NODE_TOKEN, **kw):
        kw.setdefault("pools", [PoolConfig(image=images.python, min_idle=1, max=2)])
        cluster = {"nodes": list(nodes), "token": token, "local": local, **NODE_BEATS,
                   **kw.pop("cluster", {})}
        return make_config(cluster=cluster, **kw)

    return make


# -- the lab: a Swarm of docker-in-docker nodes (tests/lab.py) ---------------------------------

# How the nodes of the lab are set: short beats (as NODE_BEATS), and a gone front's
# containers kept 5 s, so that one test's leftovers do not crowd the next.
LAB_NODE_ENV = {"UFAAS_CLUSTER_TOKEN": NODE_TOKEN, "UFAAS_CLUSTER_HEARTBEAT": "0.5",
                "UFAAS_CLUSTER_NODE_TIMEOUT": "3", "UFAAS_CLUSTER_FRONT_GRACE": "5"}


@pytest.fixture(scope="session")
def lab(docker_client, images):
    """A Swarm of three docker-in-docker nodes on this machine, made once per session
    (~15-30 s once the node image is built) and removed at its end, each node serving
    ``ufaas node`` (as ``lab.urls``, named as ``lab.node_names``). Under CI a lab that
    cannot be made fails the run. ``UFAAS_LAB_KEEP=1`` leaves it up at the end, to look at
    after a failure (``python3 tests/lab.py down`` removes it)."""
    import lab as lab_module

    the_lab = lab_module.Lab(3)
    try:
        try:
            lab_module.build_node_image()
            app = lab_module.app_image()
            the_lab.up((*lab_module.TEST_IMAGES, app))
            the_lab.app = app
            the_lab.urls = the_lab.serve_nodes(app, LAB_NODE_ENV)
        except (lab_module.LabError, OSError, subprocess.SubprocessError) as exc:
            _unavailable(f"cannot make the lab (python3 tests/lab.py build; up): {exc}")
        the_lab.node_names = [the_lab.name(n) for n in range(1, the_lab.nodes + 1)]
        yield the_lab
    finally:
        if not os.environ.get("UFAAS_LAB_KEEP"):
            the_lab.down()


@pytest.fixture
def healthy_lab(lab):
    """The lab with every fault of the test undone afterwards, each node's ``ufaas node``
    taking connections again."""
    lab.heal()
    yield lab
    lab.heal()
    for n in range(1, lab.nodes + 1):
        lab.wait_node(n)
