"""The real stack, ``deploy/ufaas-stack.yml``, deployed with ``docker stack deploy`` on the
lab Swarm (its image built without a registry, loaded into every node), and functions run
through it over HTTP and WebSocket."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio
from conftest import LAB_NODE_ENV
from test_cluster import python

from ufaas.client import Client

pytestmark = pytest.mark.slow

STACK = Path(__file__).resolve().parent.parent / "deploy" / "ufaas-stack.yml"
API_TOKEN = "api-token-of-the-stack-test"


@pytest.fixture
def stack(lab):
    """The stack deployed as ``ufaas``; removed after, with its secrets and volume."""
    manager = 1
    lab.stop_nodes()  # one ufaas node per engine: the stack's, while it runs
    try:
        lab.docker(manager, "secret", "create", "ufaas_api_token", "-",
                   input=API_TOKEN.encode())
        lab.docker(manager, "secret", "create", "ufaas_node_token", "-",
                   input=b"node-token-of-the-stack-test")
        # No registry: every node has the image, and nothing may ask a registry for it.
        lab.docker(manager, "stack", "deploy", "--resolve-image", "never", "-c", str(STACK),
                   "ufaas", env={"UFAAS_IMAGE": lab.app})
        yield f"http://{lab.ip(manager)}:8000"
    finally:
        lab.docker(manager, "stack", "rm", "ufaas", check=False)
        deadline = time.monotonic() + 60
        # The tasks go first (their ufaas node removes its containers as it stops).
        while any(lab.docker(n, "ps", "-aq", "--filter", "label=com.docker.stack.namespace"
                             "=ufaas", check=False) for n in range(1, lab.nodes + 1)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        lab.docker(manager, "secret", "rm", "ufaas_api_token", "ufaas_node_token",
                   check=False)
        lab.docker(manager, "volume", "rm", "ufaas_ufaas-data", check=False)
        lab.serve_nodes(lab.app, LAB_NODE_ENV)


async def test_the_stack_runs_functions_over_http_and_websocket(lab, stack, images):
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(base_url=stack, headers=headers, timeout=30) as client:
        with trio.fail_after(180):
            while True:  # the front's task starts, then finds tasks.ufaas-node
                try:
                    nodes = (await client.get("/nodes")).json()
                    if sorted(n["name"] for n in nodes if n["state"] == "ready") == sorted(
                            lab.node_names):
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.5)
            assert not any(n["local"] for n in nodes), nodes
            assert (await client.get("/fn")).status_code == 200
            assert (await httpx.AsyncClient(base_url=stack).get("/fn")).status_code == 401
            over_http = (await client.post("/fn?wait=90", json=python("print(6 * 7)"))).json()
            assert (over_http["status"], over_http["stdout"]) == ("succeeded", "42\n"), over_http
            assert over_http["node"] in lab.node_names
            out: list[str] = []
            async with Client(stack, token=API_TOKEN) as ufaas:
                end = await ufaas.run(python("import sys; print(sys.stdin.read().upper())"),
                                      stdin="over a websocket", stdout=out.append)
            assert end["status"] == "succeeded" and "".join(out) == "OVER A WEBSOCKET\n", end
        # Removing the stack takes its warm containers with it: each ufaas node removes
        # its own as it stops.
        await trio.to_thread.run_sync(lambda: lab.docker(1, "stack", "rm", "ufaas"))
        left: list = ["?"]
        with trio.move_on_after(60):
            while left := [c for n in range(1, lab.nodes + 1)
                           for c in lab.containers(n, "ufaas.pool")]:
                await trio.sleep(0.5)
        assert not left, [(c["Names"], c["State"], c["Labels"]) for c in left]
