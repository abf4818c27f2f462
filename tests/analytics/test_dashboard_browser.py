"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
its executable path: no browser is ever downloaded), over known traffic through two real
sidecar processes, the real ``sluice analytics`` process and a real Redis.

The traffic (namespace ``shop``): through the sidecar of policy ``api`` (API keys: ``c0`` free
at 3 an hour, ``c1`` and ``c2`` pro) 6, 5 and 4 requests; through the sidecar of policy ``batch``
(by IP, 2 an hour) 4 requests from 127.0.0.1; and one window written five hours ago (7 allowed
requests of ``key:old``), so that 1 h and 24 h differ. The page must show exactly that: the
cards, the consumer table, the chart's data and limited-now; a range change and a policy filter
change the numbers and the URL; the reset button (after a confirmation) deletes the client's
buckets in Redis. Throughout: no console error, no request off 127.0.0.1. One browser for the
module; a screenshot of each view is kept in ``.pytest_cache/dashboard-screenshots/`` (listed,
with what each shows, in its ``INDEX.txt``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)
from sluice_core import buckets, configstore, grants, keyschema, usage
from sluice_core.model import KeyGrant
from sluice_core.parse import parse_policy
from support.analytics_api import TOKEN
from support.analytics_process import CollectorProcess
from support.grant_store import key_policy, publish_policies, raw_key
from support.key_sidecar import start
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer
from support.usage_windows import StoredView, xadd_sync

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright is only its driver (never `playwright install`)
NS = "shop"
KEYS = {"c0": ("free", 6), "c1": ("pro", 5), "c2": ("pro", 4)}  # id: (tier, requests)
BATCH_REQUESTS = 4
BATCH_LIMIT = 2
OLD = 7  # key:old's allowed requests five hours ago
WAIT_MS = 20_000  # expect()'s polling deadline: only bounds a failure
expect.set_options(timeout=WAIT_MS)  # expect()'s own default is 5 s: less than one of the page's 5 s refreshes


@dataclass
class Scene:
    url: str
    redis: RedisServer
    seen: dict[str, Counter[int]]  # client as usage names it -> status codes it got
    shots: Path
    keys: dict[str, str] = field(default_factory=dict)  # key id -> the API key


def _batch_policy() -> Any:
    return parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                         "metadata": {"name": "batch", "namespace": NS},
                         "spec": {"selector": {"matchLabels": {"app": "batch"}}, "identify": {"order": ["ip"]},
                                  "tiers": [{"name": "free", "requests": BATCH_LIMIT, "period": "1h"}]}})


async def _traffic(api_url: str, batch_url: str, keys: dict[str, str]) -> dict[str, Counter[int]]:
    seen: dict[str, Counter[int]] = {}
    async with aiohttp.ClientSession() as http:
        for kid, (_, n) in KEYS.items():
            got = seen.setdefault(f"key:{kid}", Counter())
            for _ in range(n):
                async with http.get(api_url + "/api", headers={"X-API-Key": keys[kid]}) as r:
                    await r.read()
                    got[r.status] += 1
        got = seen.setdefault("ip:127.0.0.1", Counter())
        for _ in range(BATCH_REQUESTS):
            async with http.get(batch_url + "/api") as r:
                await r.read()
                got[r.status] += 1
    return seen


def _old_window() -> usage.UsageWindow:
    start_ms = (int(time.time()) - 5 * 3600) * 1000
    w = usage.UsageWindow("old-pod/run1", 0, NS, start_ms, start_ms + 10_000)
    w.rows.append(usage.UsageRow(f"{NS}/api", "key:old", "pro", "/api", "allowed", "2xx", OLD, OLD, OLD * 800, OLD))
    return w


def _entries_added(server: RedisServer) -> int:
    info = server.execute("XINFO", "STREAM", keyschema.USAGE_STREAM_KEY)
    fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
    return int(fields.get(b"entries-added", fields.get("entries-added")))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("dashboard")
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    server = RedisServer()
    keys = {kid: f"sk-dash-{kid}-{os.urandom(8).hex()}" for kid in KEYS}
    publish_policies(server.url, NS, key_policy(NS, free=3, pro=1000), _batch_policy())

    async def grant() -> None:
        async with configstore.connect(server.url) as client:
            for kid, (tier, _) in KEYS.items():
                await configstore.put_grant(client, f"{NS}/api", raw_key(keys[kid]),
                                            grants.StoredGrant(KeyGrant(tier), kid, 0))

    asyncio.run(grant())
    db = f"sqlite:///{tmp / 'usage.db'}"
    up = UpstreamProcess()
    collector = CollectorProcess(server.url, db, extra=("--api-token-file", str(token)))
    sidecars: list[SidecarProcess] = []
    try:
        for app in ("web", "batch"):
            labels = tmp / f"labels-{app}"
            labels.write_text(f'app="{app}"\n')
            sidecars.append(start(up, server.url, NS, labels, "--usage-window-s", "0.5"))
        seen = asyncio.run(_traffic(sidecars[0].url, sidecars[1].url, keys))
        for s in sidecars:
            assert s.terminate() == 0  # SIGTERM: the partial window goes out before exit
        xadd_sync(redis.Redis.from_url(server.url), [_old_window()])
        written = _entries_added(server)
        view = StoredView(db)
        poll(lambda: view.applied() == written, f"the collector applied all {written} windows",
             timeout=60, diagnose=collector.log_tail)
        # Not under the numbered temp dirs: pytest keeps only the last three of those, which
        # other pytest runs on the machine rotate away.
        shots = request.config.rootpath / ".pytest_cache" / "dashboard-screenshots"
        shutil.rmtree(shots, ignore_errors=True)
        shots.mkdir(parents=True)
        yield Scene(f"http://127.0.0.1:{collector.port}", server, seen, shots, keys)
    finally:
        for s in sidecars:
            s.close()
        collector.stop()
        up.close()
        server.close()


@pytest.fixture(scope="module")
def browser(scene: Scene) -> Iterator[Browser]:
    """After the scene: Playwright's sync API runs an event loop in this thread, where the
    scene's set-up could no longer run its own."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium as root "
                    "(hack/ensure-chromium.sh); otherwise: sudo apt-get install chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watch:
    errors: list[str] = field(default_factory=list)
    away: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def watch() -> Iterator[Watch]:
    w = Watch()
    yield w
    assert w.away == [], f"requests off 127.0.0.1: {w.away}"
    assert w.errors == [], f"console errors: {w.errors}"


def _page(browser: Browser, watch: Watch, *, width: int = 1280, height: int = 900, **kw: Any) -> Page:
    context = browser.new_context(viewport={"width": width, "height": height}, **kw)

    def route(r: Route, request: Request) -> None:
        watch.requests.append(request.url)
        url = request.url.removeprefix("blob:")  # a blob: URL made by the page names its origin
        if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
            watch.away.append(request.url)
            r.abort()
        else:
            r.continue_()

    def console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            watch.errors.append(msg.text)

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", console)
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    page.set_default_timeout(WAIT_MS)
    return page


def _shot(scene: Scene, page: Page, name: str, what: str) -> None:
    path = scene.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with (scene.shots / "INDEX.txt").open("a") as index:
        index.write(f"{path}: {what}\n")


def _sign_in(page: Page, scene: Scene, query: str = "") -> None:
    page.goto(f"{scene.url}/?namespace={NS}{query}")
    page.fill("#s-token", TOKEN)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin")).to_be_hidden()


def _cards(page: Page, box: str = "#cards") -> dict[str, str]:
    pairs: list[list[str]] = page.locator(f"{box} .card").evaluate_all(
        "cs => cs.map(c => [c.querySelector('dt').textContent, c.querySelector('dd').textContent])")
    return dict((k, v) for k, v in pairs)


def _rows(page: Page, table: str) -> list[list[str]]:
    rows: list[list[str]] = page.locator(f"[data-table={table}] tbody tr").evaluate_all(
        "rs => rs.map(r => Array.from(r.cells, c => c.textContent))")
    return rows


def _n(text: str) -> int:
    return int(text.replace(",", ""))


def _expect_card(page: Page, name: str, value: str) -> None:
    expect(page.locator("#cards .card", has_text=name).locator("dd")).to_have_text(value)


def _sent(scene: Scene, clients: list[str] | None = None) -> tuple[int, int]:
    """(requests, limited) the clients saw: every 200 allowed, every 429 limited."""
    chosen = [c for c in scene.seen if clients is None or c in clients]
    return (sum(sum(scene.seen[c].values()) for c in chosen), sum(scene.seen[c][429] for c in chosen))


def test_nothing_is_shown_before_the_token_is_accepted(browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch)
    page.goto(f"{scene.url}/?namespace={NS}")
    expect(page.locator("#signin")).to_be_visible()
    for hidden in ("#overview", "#client", "#filters"):
        expect(page.locator(hidden)).to_be_hidden()
    _shot(scene, page, "01-sign-in", "the sign-in: the only thing shown before a token is accepted")
    page.fill("#s-token", "not-the-token")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("not valid")
    expect(page.locator("#overview")).to_be_hidden()
    assert page.locator("[data-table]").count() == 0  # no data in the page at all
    assert all("/v1/" not in u or "overview" in u for u in watch.requests)  # only the sign-in check
    # Chromium logs every refused fetch itself; the wrong token's 401 is the one expected here.
    assert [e for e in watch.errors if "401" not in e] == []
    watch.errors.clear()
    page.context.close()


def test_overview_shows_what_was_sent(browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch)
    _sign_in(page, scene)
    requests, limited = _sent(scene)
    assert (requests, limited) == (19, 5)  # 6 + 5 + 4 + 4; c0 past 3, batch past 2
    _expect_card(page, "Requests", str(requests))
    _expect_card(page, "Limited", f"{100 * limited / requests:.1f} %")
    _expect_card(page, "Success rate", f"{100 * (requests - limited) / requests:.1f} %")  # every 200 a 2xx
    _expect_card(page, "Active consumers", str(len(scene.seen)))
    expect(page.locator("[data-table=consumers] tbody tr")).to_have_count(len(scene.seen))
    rows = {r[0]: r for r in _rows(page, "consumers")}
    for client, codes in scene.seen.items():
        assert (_n(rows[client][2]), _n(rows[client][3])) == (sum(codes.values()), codes[429]), rows[client]
    assert rows["key:c0"][1] == "free" and rows["key:c1"][1] == "pro" and rows["ip:127.0.0.1"][1] == "free"
    chart = _rows(page, "series")
    header: list[str] = page.locator("[data-table=series] thead th").all_text_contents()
    sums = {name: sum(_n(r[i]) for r in chart) for i, name in enumerate(header) if i}
    assert sums == {"allowed": requests - limited, "limited": limited, "shadow-limited": 0, "failed": 0, "other": 0}
    limited_now = {(r[0], r[1]): _n(r[4]) for r in _rows(page, "limited")}
    assert limited_now == {("key:c0", f"{NS}/api"): 3, ("ip:127.0.0.1", f"{NS}/batch"): 2}
    endpoints = {r[0]: (_n(r[1]), _n(r[2])) for r in _rows(page, "endpoints")}
    assert endpoints == {"/api": (requests, limited)}
    cards = page.locator("[data-policy]")
    expect(cards).to_have_count(2)
    expect(page.locator(f"[data-policy='{NS}/api']")).to_contain_text("enforce")
    _shot(scene, page, "02-overview-1h", "the overview, last hour: 19 requests, 5 limited, four consumers")
    with page.expect_download() as download:
        page.click("#csv")
    report = Path(download.value.path()).read_text().splitlines()
    assert report[0] == "day,namespace,policy,client,tier,requests,allowed,limited,tokens,bytes_in,bytes_out"
    per_client: Counter[str] = Counter()
    for line in report[1:]:  # whole UTC days: five hours ago may be in today
        per_client[line.split(",")[3]] += int(line.split(",")[5])
    assert {c: n for c, n in per_client.items() if c != "key:old"} == {c: sum(v.values()) for c, v in scene.seen.items()}
    page.context.close()


def test_range_and_filter_change_the_numbers_and_the_url(browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch)
    _sign_in(page, scene)
    requests, _ = _sent(scene)
    _expect_card(page, "Requests", str(requests))
    page.click("[data-range='24h']")
    _expect_card(page, "Requests", str(requests + OLD))  # the window of five hours ago is in
    expect(page.locator("[data-table=consumers] tbody tr")).to_have_count(len(scene.seen) + 1)
    assert "range=24h" in page.url
    assert page.locator("#volume-step").text_content() == "per hour, last 24h"
    _shot(scene, page, "03-overview-24h", "the last 24 h, per hour: five hours ago key:old's 7 requests")
    page.select_option("#f-policy", f"{NS}/batch")
    batch, batch_limited = _sent(scene, ["ip:127.0.0.1"])
    _expect_card(page, "Requests", str(batch))
    _expect_card(page, "Limited", f"{100 * batch_limited / batch:.1f} %")
    expect(page.locator("[data-table=consumers] tbody tr")).to_have_count(1)
    assert "policy=shop%2Fbatch" in page.url
    _shot(scene, page, "04-policy-batch", "the policy filter shop/batch over 24 h: 127.0.0.1's 4 requests")
    page.go_back()  # the URL is the view: back is the unfiltered 24 h
    _expect_card(page, "Requests", str(requests + OLD))
    shared = page.url
    page.context.close()
    again = _page(browser, watch)  # a link to a view opens that view (after the sign-in)
    again.goto(shared)
    again.fill("#s-token", TOKEN)
    again.click("#signin-form button[type=submit]")
    _expect_card(again, "Requests", str(requests + OLD))
    again.context.close()


def _bucket_keys_left(scene: Scene, policy: Any, client: str) -> int:
    keys = [k.key for k in buckets.bucket_keys(policy, client)]
    return int(scene.redis.execute("EXISTS", *keys))


def test_reset_button_resets_the_clients_buckets(browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch)
    _sign_in(page, scene, "&policy=shop%2Fbatch&range=1h")
    page.click("[data-table=consumers] button[data-client='ip:127.0.0.1']")
    expect(page.locator("#client")).to_be_visible()
    assert "client=ip%3A127.0.0.1" in page.url
    expect(page.locator("#client-cards .card", has_text="Limited").locator("dd")).to_have_text("2")
    expect(page.locator("[data-table=buckets] tbody tr")).to_have_count(1)
    row = _rows(page, "buckets")[0]
    assert row[0] == "tier free" and row[1] == f"0 / {BATCH_LIMIT}", row
    policy = _batch_policy()
    client = keyschema.client_for_ip("127.0.0.1")
    assert _bucket_keys_left(scene, policy, client) == 1
    _shot(scene, page, "05-client", "one client (ip:127.0.0.1 under shop/batch): its series and its empty bucket")
    page.click("#reset")
    expect(page.locator("#confirm")).to_be_visible()
    _shot(scene, page, "06-reset-confirm", "the reset asks for confirmation")
    page.keyboard.press("Escape")  # cancelled: nothing happens
    expect(page.locator("#confirm")).to_be_hidden()
    assert _bucket_keys_left(scene, policy, client) == 1
    page.click("#reset")
    page.click("#confirm button[value=reset]")
    expect(page.locator("#status")).to_contain_text("Reset: 1 buckets")
    assert _bucket_keys_left(scene, policy, client) == 0
    expect(page.locator("[data-table=buckets] tbody tr td").nth(1)).to_have_text(f"{BATCH_LIMIT} / {BATCH_LIMIT}")
    page.context.close()


def test_an_api_key_clients_buckets_are_found_by_the_key_hashed_in_the_page(
        browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch)
    _sign_in(page, scene, "&policy=shop%2Fapi&client=key%3Ac0")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#k-key", scene.keys["c0"])
    page.click("#key-form button[type=submit]")
    expect(page.locator("[data-table=buckets] tbody tr")).to_have_count(2)  # tiers free and pro
    rows = {r[0]: r[1] for r in _rows(page, "buckets")}
    assert rows["tier free"] == "0 / 3", rows
    assert all(scene.keys["c0"] not in u for u in watch.requests)  # hashed, never sent
    page.context.close()


def test_dark_theme_and_a_phone(browser: Browser, scene: Scene, watch: Watch) -> None:
    page = _page(browser, watch, width=390, height=844, is_mobile=True, has_touch=True, device_scale_factor=2)
    _sign_in(page, scene)
    _expect_card(page, "Requests", str(_sent(scene)[0]))
    page.click("#theme")
    page.click("#theme")  # automatic -> light -> dark
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    expect(page.locator("[data-table=consumers]")).to_be_visible()
    expect(page.locator("#volume-chart canvas")).to_be_visible()  # drawn again in the new colours
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px phone"
    _shot(scene, page, "07-phone-dark", "a 390 px phone, dark theme")
    page.context.close()


def test_the_demo_traffic_shows_up_on_its_dashboard(browser: Browser, watch: Watch) -> None:
    """``make demo`` (``sluice demo``): the URL it prints opens the dashboard, and with the token
    file it names, the tour's clients are on the page."""
    demo = subprocess.Popen([sys.executable, "-m", "sluice_core.cli", "demo", "--port", "0", "--admin-port", "0",
                             "--analytics-port", "0", "--store", "redis", "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # bounded by --duration: the demo exits and the pipe ends
            lines.append(line)
            if line.startswith("Serving"):
                break
        printed = next(line for line in lines if line.startswith("Dashboard: "))
        url = printed.split()[1]
        token = Path(printed.rsplit(" ", 1)[1].rstrip(")\n")).read_text().strip()
        page = _page(browser, watch)
        page.goto(url)
        page.fill("#s-token", token)
        page.click("#signin-form button[type=submit]")
        for client in ("ip:127.0.0.1", "key:demo-pro", "key:demo-enterprise"):  # its tour's clients
            expect(page.locator(f"[data-table=consumers] button[data-client='{client}']")).to_be_visible()
        page.context.close()
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(5)
