"""The dashboard (``GET /``) and the API browser (``/docs``) in a real headless browser:
Debian's chromium driven by playwright, against the real server with a token. Functions
submitted over HTTP appear, run, stream their output and finish on the page, which never
reloads; what callers wrote is shown as text, never run as HTML.

Under CI=true a missing browser fails the run (see conftest).
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from command import ThreadedServer
from conftest import _unavailable

from ufaas.config import Config, PoolConfig

TOKEN = "dash-token"
CHROMIUM = os.environ.get("UFAAS_CHROMIUM", "/usr/bin/chromium")
# Headless, as root, in a network of its own: no sandbox (root), and none of the
# background connections (updates, sync, safe browsing) that a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 20_000  # the longest any one thing may take to show on the page
TICKS = 16
# Prints a tick every half second: still running when the page first shows it.
TICKER = f"for i in $(seq 1 {TICKS}); do echo tick $i; sleep 0.5; done; echo done >&2"
HOSTILE = '<img src=x onerror="document.title=1"><b>bold</b>'


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not installed: {exc}")
    if not shutil.which(CHROMIUM):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        # Playwright gives it a new empty profile (--user-data-dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dashboard_server(docker_client, images, tmp_path_factory, module_labels):
    config = Config.load(
        None, environ={}, port=0, token=TOKEN,
        db=str(tmp_path_factory.mktemp("dashboard") / "ufaas.db"),
        pools=[PoolConfig(image=images.python, min_idle=1, max=2)])
    with ThreadedServer(config, instance=f"{module_labels['ufaas.test']}-dash",
                        labels=module_labels) as server:
        yield server.url


def test_dashboard_shows_functions_live(browser, dashboard_server, images, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    api = httpx.Client(base_url=dashboard_server, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}"})

    page.goto(f"{dashboard_server}/")
    # The token is asked for once, and kept for this tab.
    form = page.locator("#token-form")
    expect(form).to_be_visible()
    form.locator("input").fill(TOKEN)
    form.locator("button").click()
    expect(form).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('ufaas.token')") == TOKEN
    expect(page.locator("#live")).to_have_text("live")
    pool = page.locator(f'#pools tr[data-image="{images.python}"]')
    expect(pool).to_be_visible()
    expect(pool.locator("td").nth(1)).to_have_text("agent")

    python = images.python
    ticker = api.post("/fn", json={"image": python, "command": TICKER}).json()
    row = page.locator(f'#active tr[data-id="{ticker["id"]}"]')
    expect(row).to_be_visible()
    expect(row.locator(".status")).to_have_text("running")
    row.click()
    output = page.locator("#output")
    expect(output).to_contain_text("tick 1")
    early = output.text_content()
    page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
    expect(output).to_contain_text(f"tick {TICKS}")
    expect(output).to_contain_text("done")
    assert f"tick {TICKS}" not in early, "the output came all at once, not live"
    expect(page.locator("#output-status")).to_have_text("succeeded (exit 0)")
    expect(row).to_have_count(0)  # no longer running

    first = api.post("/fn?wait=30", json={"image": python, "command": ["echo", "hi"]}).json()
    follow = api.post(f"/fn/{first['id']}?wait=30", json={"command": "exit 3"}).json()
    hostile = api.post("/fn?wait=30", json={"image": python, "command": f"echo '{HOSTILE}'"}
                       ).json()
    for record, status in ((ticker, "succeeded"), (first, "succeeded"), (follow, "failed"),
                           (hostile, "succeeded")):
        finished = page.locator(f'#finished tr[data-id="{record["id"]}"]')
        expect(finished.locator(".status")).to_have_text(status)
    expect(page.locator(f'#finished tr[data-id="{follow["id"]}"] td').nth(5)).to_have_text("hit")
    expect(page.locator(f'#finished tr[data-id="{first["id"]}"] td').nth(4)
           ).to_contain_text(" ms")
    expect(page.locator("#chart rect")).to_have_count(4)

    # What a caller wrote is text on the page, in the listing and in the output.
    hostile_row = page.locator(f'#finished tr[data-id="{hostile["id"]}"]')
    expect(hostile_row).to_contain_text(HOSTILE)
    hostile_row.click()
    expect(output).to_have_text(HOSTILE + "\n")
    assert page.locator("main img").count() == 0
    assert page.title() == "ufaas" and dialogs == [] and errors == []

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # The API browser reads the same token from the tab's session.
    page.goto(f"{dashboard_server}/docs")
    expect(page.locator("details.operation")).to_have_count(15)
    expect(page.locator("#operations")).to_contain_text("/fn/{fid}")
    expect(page.locator("#schema-RecordView")).to_contain_text("duration_ms")
    expect(page.locator("#token-form")).to_be_hidden()
    page.locator("details.operation", has_text="GET /fn ").first.click()
    page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    assert errors == []
    api.close()
    page.close()
