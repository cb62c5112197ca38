"""``GET /metrics`` after a known workload, read with prometheus-client's own parser: each
count is the workload's, and no label holds a function id."""

from __future__ import annotations

import sites
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

BODY = b"fetched\n"
# Not here, and its registry is a closed port of this machine: the pull fails at once.
MISSING_IMAGE = "127.0.0.1:1/nowhere/image:1"


def scrape(text):
    """{sample name: {frozenset of label items: value}}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get(name, {}).get(frozenset(labels.items()), 0)


async def test_metrics_count_a_known_workload(start_server, python_config, images, make_site):
    site = make_site({"/data": sites.send(BODY)})
    python = images.python
    with trio.fail_after(90):
        client = await start_server(python_config(fetch_allow=["127.0.0.1/32"]))

        async def run(path, spec):
            r = await client.post(f"{path}?wait=30", json=spec)
            assert r.status_code == 200, r.text
            return r.json()

        first = await run("/fn", {"image": python, "command": ["echo", "hi"]})
        hit = await run(f"/fn/{first['id']}", {"command": ["true"]})
        assert hit["locality"] == "hit"
        r = await client.delete(f"/fn/{hit['id']}?container=remove")
        assert r.status_code == 200
        miss = await run(f"/fn/{hit['id']}", {"command": ["true"]})
        assert miss["locality"] == "miss"
        failed = await run("/fn", {"image": python, "command": "exit 3"})
        assert failed["status"] == "failed"
        fetched = {"image": python, "command": ["cat", "f"],
                   "resources": [{"path": "f", "url": f"{site.url}/data"}]}
        for _ in range(2):
            assert (await run("/fn", fetched))["stdout"] == BODY.decode()
        nowhere = await run("/fn", {"image": MISSING_IMAGE, "command": ["true"]})
        assert nowhere["status"] == "error", nowhere
        ws_url = str(client.base_url).replace("http", "ws", 1) + "/fn/ws"
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message('{"op": "watch", "id": "*"}')
            samples = scrape((await client.get("/metrics")).text)
            assert value(samples, "ufaas_websocket_connections") == 1
        ids = [f["id"] for f in (first, hit, miss, failed, nowhere)]

        while True:  # the socket's end is seen by the server a moment later
            r = await client.get("/metrics")
            samples = scrape(r.text)
            if value(samples, "ufaas_websocket_connections") == 0:
                break
            await trio.sleep(0.05)
        pools = (await client.get("/pools")).json()

    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    invocations = "ufaas_function_invocation_total"
    assert value(samples, invocations, image=python, status="succeeded") == 5
    assert value(samples, invocations, image=python, status="failed") == 1
    assert value(samples, invocations, image="other", status="error") == 1
    assert sum(samples[invocations].values()) == 7
    for histogram in ("ufaas_function_duration_seconds", "ufaas_function_queue_seconds",
                      "ufaas_function_start_delay_seconds"):
        # Every function that started, and only those (the missing image never did).
        assert value(samples, f"{histogram}_count", image=python) == 6, histogram
        assert value(samples, f"{histogram}_count", image="other") == 0, histogram
        assert value(samples, f"{histogram}_bucket", image=python, le="+Inf") == 6
    assert value(samples, "ufaas_function_locality_total", result="hit") == 1
    assert value(samples, "ufaas_function_locality_total", result="miss") == 1
    assert value(samples, "ufaas_url_downloads_total") == 1
    assert value(samples, "ufaas_url_cache_hits_total") == 1
    assert value(samples, "ufaas_url_downloads_in_flight") == 0
    assert value(samples, "ufaas_websocket_connections_opened_total") == 1
    assert value(samples, "ufaas_queue_length") == 0
    assert value(samples, "ufaas_functions_running") == 0
    # Output files and callbacks: none in this workload, but their series are there.
    for name in ("ufaas_output_files_bytes", "ufaas_output_files_cut_total",
                 "ufaas_callbacks_sending", "ufaas_callbacks_delivered_total",
                 "ufaas_callbacks_failed_total"):
        assert value(samples, name) == 0 and name in samples, name
    assert value(samples, "ufaas_output_files_max_bytes") > 0

    (pool,) = [p for p in pools if p["image"] == python]
    names = {"pool": pool["name"], "image": python}
    for state in ("warm", "busy", "starting"):
        assert value(samples, "ufaas_pool_containers", **names, state=state) == pool[state]
    assert value(samples, "ufaas_pool_waiting", **names) == 0
    assert value(samples, "ufaas_container_retirements_total", **names,
                 reason="discarded") == 1
    # The first warm one, the one that replaced the discarded one, and maybe a spare.
    assert value(samples, "ufaas_container_starts_total", **names) >= 2
    assert value(samples, "ufaas_container_start_failures_total", **names) == 0

    labels = {v for series in samples.values() for key in series for _, v in key}
    assert not labels & set(ids), "a function id became a label value"
