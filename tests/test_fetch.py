"""URL downloads from a real HTTP server on 127.0.0.1: limits, deadlines, errors, the cache."""

from __future__ import annotations

import hashlib
import socket

import pytest
import sites
import trio

from ufaas.fetch import Downloader as Fetcher
from ufaas.fetch import FetchError

BODY = b"hello, world\n" * 100
LIMIT = 4096
CAP = 10  # seconds: the most any test here may take


ROUTES = {
    "/file": sites.send(BODY),
    "/other": sites.send(BODY),
    "/big": sites.send(b"x" * (LIMIT + 1)),
    "/big-unsized": sites.unsized(64 * 1024),
    "/slow": sites.after(0.3, BODY),
    "/drip": sites.drip(1.0),
    "/drip-fast": sites.drip(0.05),
    "/drip-headers": sites.drip_headers(0.25),
    "/redirect": sites.redirect("/file"),
    "/redirect-ftp": sites.redirect("ftp://127.0.0.1/file"),
}


@pytest.fixture
def site(make_site):
    return make_site(ROUTES)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def Downloader(**kw) -> Fetcher:  # noqa: N802 - the class, with this file's defaults
    """A downloader allowed to reach the test site on 127.0.0.1 (the address policy refuses
    loopback by default)."""
    kw.setdefault("max_bytes", 8 << 20)
    kw.setdefault("timeout", 30.0)
    kw.setdefault("allow", ["127.0.0.1/32"])
    return Fetcher(**kw)


async def test_fetches_bytes(site):
    with trio.fail_after(CAP):
        assert await Downloader().fetch(f"{site.url}/file") == BODY


async def test_sha256_match_and_mismatch(site):
    with trio.fail_after(CAP):
        downloader = Downloader()
        assert await downloader.fetch(f"{site.url}/file", sha(BODY).upper()) == BODY
        with pytest.raises(FetchError, match="sha256") as info:
            await downloader.fetch(f"{site.url}/other", sha(b"something else"))
        assert "/other" in str(info.value)


async def test_malformed_sha256_refused(site):
    with trio.fail_after(CAP), pytest.raises(FetchError, match="64 hexadecimal"):
        await Downloader().fetch(f"{site.url}/file", "abc")
    assert site.requests["/file"] == 0


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
async def test_size_limit(site, path):
    with trio.fail_after(CAP), pytest.raises(FetchError, match=f"{path}: larger than"):
        await Downloader(max_bytes=LIMIT).fetch(f"{site.url}{path}")


async def test_exact_size_limit_is_allowed(site):
    with trio.fail_after(CAP):
        assert await Downloader(max_bytes=len(BODY)).fetch(f"{site.url}/file") == BODY


async def test_slow_drip_fails_at_the_deadline(site):
    timeout = 2.0
    with trio.fail_after(timeout + 2), pytest.raises(FetchError, match="within 2 s"):
        await Downloader(timeout=timeout).fetch(f"{site.url}/drip")


async def test_dripped_headers_fail_and_the_connection_is_closed(site):
    timeout = 1.0
    with trio.fail_after(timeout + 2), pytest.raises(FetchError, match="within 1 s"):
        await Downloader(timeout=timeout).fetch(f"{site.url}/drip-headers")
    with trio.fail_after(CAP):
        await trio.to_thread.run_sync(site.disconnected.wait)


async def test_http_error(site):
    with trio.fail_after(CAP), pytest.raises(FetchError, match="/nothing: HTTP 404"):
        await Downloader().fetch(f"{site.url}/nothing")


async def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(CAP), pytest.raises(FetchError, match=f"127.0.0.1:{port}/"):
        await Downloader().fetch(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello", "http:///x", "/x"]
)
async def test_only_http_urls(url):
    with trio.fail_after(CAP), pytest.raises(FetchError, match="http"):
        await Downloader().fetch(url)


async def test_redirects(site):
    with trio.fail_after(CAP):
        downloader = Downloader()
        assert await downloader.fetch(f"{site.url}/redirect") == BODY
        with pytest.raises(FetchError, match="redirect refused"):
            await downloader.fetch(f"{site.url}/redirect-ftp")


async def test_second_fetch_is_cached(site):
    with trio.fail_after(CAP):
        downloader = Downloader()
        for _ in range(2):
            assert await downloader.fetch(f"{site.url}/file") == BODY
        assert site.requests["/file"] == 1
        stats = downloader.statistics()
        assert (stats.downloads, stats.cache_hits, stats.cached_bytes) == (1, 1, len(BODY))


async def test_pinned_content_is_shared_between_urls(site):
    with trio.fail_after(CAP):
        downloader = Downloader()
        await downloader.fetch(f"{site.url}/file")
        assert await downloader.fetch(f"{site.url}/other", sha(BODY)) == BODY
        assert site.requests["/other"] == 0


async def test_unpinned_entries_expire(site):
    with trio.fail_after(CAP):
        downloader = Downloader(cache_max_age=0)
        await downloader.fetch(f"{site.url}/file")
        await downloader.fetch(f"{site.url}/file")
        assert site.requests["/file"] == 2
        await downloader.fetch(f"{site.url}/other", sha(BODY))
        await downloader.fetch(f"{site.url}/other", sha(BODY))
        assert site.requests["/other"] == 1


async def test_least_recently_used_is_evicted(site):
    with trio.fail_after(CAP):
        downloader = Downloader(cache_bytes=len(BODY) * 3 // 2)
        await downloader.fetch(f"{site.url}/file")
        await downloader.fetch(f"{site.url}/other")
        await downloader.fetch(f"{site.url}/other")
        await downloader.fetch(f"{site.url}/file")
        assert site.requests == {"/file": 2, "/other": 1}
        assert downloader.statistics().cached_bytes == len(BODY)


async def test_errors_are_not_cached(site):
    with trio.fail_after(CAP):
        downloader = Downloader()
        for _ in range(2):
            with pytest.raises(FetchError):
                await downloader.fetch(f"{site.url}/nothing")
        assert site.requests["/nothing"] == 2


async def test_concurrent_fetches_share_one_download(site):
    results = []

    async def fetch() -> None:
        results.append(await downloader.fetch(f"{site.url}/slow"))

    downloader = Downloader()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch)
    assert results == [BODY] * 3
    assert site.requests["/slow"] == 1


async def test_concurrent_fetches_share_an_error(site):
    downloader = Downloader(max_bytes=LIMIT)
    errors = []

    async def fetch() -> None:
        try:
            await downloader.fetch(f"{site.url}/big")
        except FetchError as exc:
            errors.append(str(exc))

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch)
    assert len(errors) == 3 and len(set(errors)) == 1
    assert site.requests["/big"] == 1


async def test_cancelled_fetch_closes_its_connection(site):
    # The download's own deadline is far beyond the test's cap: only the abort ends it.
    downloader = Downloader(timeout=60)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(downloader.fetch, f"{site.url}/drip-fast")
            while not site.requests["/drip-fast"]:  # cancelled once the site is answering
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert downloader.statistics().in_flight == 0
        await trio.to_thread.run_sync(site.disconnected.wait)
