"""URL resources against the address policy and each other, with real local sites: what
may not be reached is not, one slow origin does not starve the rest, and a PUT that
comes during a download is the spec that runs."""

from __future__ import annotations

import socket
import threading

import pytest
import sites
import trio

from ufaas.config import PoolConfig
from ufaas.fetch import Downloader, FetchError, Forbidden

CAP = 60
BODY = b"fetched\n"


def downloader(**kw):
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("timeout", 10.0)
    return Downloader(**kw)


@pytest.fixture
def site(make_site):
    return make_site({"/file": sites.send(BODY)})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001",
                                  "2130706433", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]"])
async def test_loopback_is_refused_however_written(site, host):
    port = site.url.rsplit(":", 1)[1]
    url = f"http://{host}:{port}/file"
    with trio.fail_after(CAP), pytest.raises(Forbidden) as info:
        await downloader().fetch(url)
    assert str(info.value).startswith(url) and "loopback" in str(info.value)
    assert site.requests["/file"] == 0


@pytest.mark.parametrize(("url", "rule"), [
    ("http://10.1.2.3/x", "private"), ("http://192.168.0.1/x", "private"),
    ("http://172.16.0.1/x", "private"), ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/x", "link-local"), ("http://[fd00::1]/x", "private"),
    ("http://224.0.0.1/x", "multicast"), ("http://0.0.0.0/x", "unspecified"),
    ("http://[::ffff:10.0.0.1]/x", "private"), ("http://240.0.0.1/x", "reserved"),
])
async def test_private_and_special_ranges_are_refused(url, rule):
    with trio.fail_after(CAP), pytest.raises(Forbidden) as info:
        await downloader().fetch(url)
    assert rule in str(info.value), info.value


async def test_names_are_checked_after_dns(site):
    """A name that resolves to a refused address (this machine's own name, say) is refused
    when it is fetched, not only literal addresses when a spec comes in."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    port = site.url.rsplit(":", 1)[1]
    with trio.fail_after(CAP), pytest.raises(Forbidden) as info:
        await downloader().fetch(f"http://{name}:{port}/file")
    assert address in str(info.value)


async def test_a_redirect_to_a_refused_address_is_refused(make_site):
    target = make_site({"/secret": sites.send(b"secret")})
    port = target.url.rsplit(":", 1)[1]
    start = make_site({"/go": sites.redirect(f"http://127.0.0.2:{port}/secret")})
    with trio.fail_after(CAP), pytest.raises(Forbidden) as info:
        await downloader(allow=["127.0.0.1/32"]).fetch(f"{start.url}/go")
    assert "redirected to http://127.0.0.2" in str(info.value), info.value
    assert target.requests["/secret"] == 0


async def test_the_allow_list_by_network_and_by_name(site, monkeypatch):
    port = site.url.rsplit(":", 1)[1]
    with trio.fail_after(CAP):
        assert await downloader(allow=["127.0.0.0/8"]).fetch(f"{site.url}/file") == BODY
        assert await downloader(allow=["localhost"]).fetch(
            f"http://localhost:{port}/file") == BODY
        # A name allowed is allowed by name only: another name for the same place is not.
        with pytest.raises(Forbidden):
            await downloader(allow=["localhost"]).fetch(f"{site.url}/file")
        # Proxy variables are not used: the download goes where it was told, directly.
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        assert await downloader(allow=["127.0.0.1/32"]).fetch(f"{site.url}/file") == BODY


async def test_one_slow_origin_does_not_take_every_slot(make_site):
    """Eight downloads dripping from one origin hold at most its two slots: a download
    from another origin gets a slot and ends while they still drip."""
    slow = make_site({f"/drip{i}": sites.drip(0.5) for i in range(8)})
    quick = make_site({"/file": sites.send(BODY)})
    fetcher = downloader(allow=["127.0.0.1/32"], concurrency=4, per_origin=2, timeout=30)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(_expect_failure, fetcher, f"{slow.url}/drip{i}")
            while sum(slow.requests.values()) < 2:
                await trio.sleep(0.02)
            assert await fetcher.fetch(f"{quick.url}/file") == BODY
            assert sum(slow.requests.values()) == 2  # the other six still wait their turn
            nursery.cancel_scope.cancel()


async def _expect_failure(fetcher, url):
    with pytest.raises(FetchError):
        await fetcher.fetch(url)


async def test_the_wait_for_a_slot_does_not_count_against_a_download(make_site):
    """One slot: the second download waits for the first (0.8 s), then takes 0.6 s of its
    own. Its 1 s deadline counts from its slot, so it ends well, 1.4 s after it began."""
    site = make_site({"/first": sites.after(0.8, b"1"), "/second": sites.after(0.6, b"2")})
    fetcher = downloader(allow=["127.0.0.1/32"], concurrency=1, per_origin=1, timeout=1.0)
    results = {}

    async def fetch(name):
        results[name] = await fetcher.fetch(f"{site.url}/{name}")

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "first")
            while site.requests["/first"] == 0:
                await trio.sleep(0.01)
            nursery.start_soon(fetch, "second")
    assert results == {"first": b"1", "second": b"2"}


def together(parties: int) -> sites.Route:
    """Answers once ``parties`` requests are in flight at the same time, else a 503."""
    barrier = threading.Barrier(parties)

    def route(request):
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            request.send_error(503)
            return
        sites.send(BODY)(request)
    return route


async def test_a_functions_urls_are_fetched_at_once(start_server, make_config, images,
                                                    make_site):
    # Two at once: as many as one origin gets (downloads_per_origin).
    meet = together(2)
    site = make_site({"/part0": meet, "/part1": meet, "/slow": sites.drip(0.5)})
    config = make_config(fetch_allow=["127.0.0.1/32"], queue_timeout=2, download_timeout=30,
                         pools=[PoolConfig(image=images.busybox, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        spec = {"image": images.busybox, "command": "cat part0 part1",
                "resources": [{"path": f"part{i}", "url": f"{site.url}/part{i}"}
                              for i in range(2)]}
        rec = (await client.post("/fn?wait=30", json=spec)).json()
        assert rec["status"] == "succeeded", rec
        assert rec["stdout"] == BODY.decode() * 2
        # All of a function's URLs have queue_timeout in all, however patient each one is.
        slow = {**spec, "resources": [{"path": "slow", "url": f"{site.url}/slow"}]}
        rec = (await client.post("/fn?wait=30", json=slow)).json()
        assert rec["status"] == "error" and "within 2 s" in rec["error"], rec


async def test_submission_refuses_what_it_can_see(start_server, make_config):
    with trio.fail_after(CAP):
        client = await start_server(make_config())
        for url in ("http://127.0.0.1/x", "http://localhost:8000/x", "http://[::1]/x",
                    "http://169.254.169.254/",
                    str(client.base_url).rstrip("/") + "/fn?token=stolen"):
            r = await client.post("/fn", json={"image": "ufaas-test/busybox", "command": "true",
                                               "resources": [{"path": "x", "url": url}]})
            assert r.status_code == 422, (url, r.text)
            assert r.json()["error"].startswith("resources.0.url: ") and "is " in \
                r.json()["error"], r.text


async def test_a_put_during_its_downloads_is_what_runs(start_server, make_config, images,
                                                       make_site):
    """The review's case: POST `echo old` with a URL that answers after 2 s, PUT `echo new`
    meanwhile: the record says `echo new`, and so does the function."""
    site = make_site({"/late": sites.after(2.0, b"late")})
    config = make_config(fetch_allow=["127.0.0.1/32"],
                         pools=[PoolConfig(image=images.busybox, min_idle=1, max=1)])
    with trio.fail_after(CAP):
        client = await start_server(config)
        rec = (await client.post("/fn", json={
            "image": images.busybox, "command": "echo old",
            "resources": [{"path": "late", "url": f"{site.url}/late"}]})).json()
        while site.requests["/late"] == 0:
            await trio.sleep(0.02)
        r = await client.put(f"/fn/{rec['id']}", json={"command": "echo new; cat late"})
        assert r.status_code == 200 and r.json()["spec"]["command"] == "echo new; cat late"
        done = (await client.get(f"/fn/{rec['id']}?wait=30")).json()
        assert done["status"] == "succeeded", done
        assert done["stdout"] == "new\nlate"
