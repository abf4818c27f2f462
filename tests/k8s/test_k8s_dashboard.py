"""The dashboard with ``--api-auth kubernetes`` against the test control plane's real API
server: the policy cards come from the RateLimitPolicy's own status (as the operator wrote it),
and what the page offers follows the caller's RBAC: the usage viewer sees the client's buckets
and no reset button, the usage admin gets the button, a token without the role sees nothing but
the sign-in and why. In Debian's chromium (Playwright's async API, by executable path)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Page, async_playwright, expect
from sluice_analytics import dashboard
from sluice_analytics.api import ApiContext, routes
from sluice_analytics.auth import KubernetesAuth, load_api_server
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.redis_servers import RedisServer
from support.sidecar_harness import policy_doc
from test_k8s_usage_auth import cluster  # noqa: F401 (fixture: the namespace and its three accounts)

pytestmark = pytest.mark.k8s

CHROMIUM = "/usr/bin/chromium"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def served(cluster: Any, control_plane: ControlPlane, engine: AsyncEngine,  # noqa: F811
                 redis_server: RedisServer) -> AsyncIterator[tuple[str, Client]]:
    """The policy ``api`` as an object with the status the operator would write, and in Redis;
    the API and the page on a loopback port."""
    ns, _ = cluster
    apply_crds(control_plane)
    doc = policy_doc("api", ns, tiers=[{"name": "free", "requests": 5, "period": "1h"}])
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    status = {"status": {"configVersion": 4, "enforcedSidecars": 2, "conditions": [
        {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": "2026-11-29T08:00:00Z"}
        for t, r in (("Accepted", "Valid"), ("Programmed", "InRedis"), ("Enforced", "SidecarsReporting"))]}}
    control_plane.kubectl("-n", ns, "patch", "ratelimitpolicy", "api", "--subresource=status", "--type=merge",
                          "-p", yaml.safe_dump(status))
    auth = KubernetesAuth(load_api_server(str(control_plane.kubeconfig)))
    async with configstore.connect(redis_server.url) as redis:
        await configstore.publish(redis, ns, configdoc.build_doc(ns, [parse_policy(doc)]))
        app = web.Application()
        ctx = ApiContext(engine, auth, redis)
        app.add_routes(routes(ctx))
        app.add_routes(dashboard.routes(ctx))
        client: Client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        yield ns, client
        await client.close()
    await auth.close()


async def test_policy_cards_come_from_the_status(served: tuple[str, Client], cluster: Any) -> None:  # noqa: F811
    ns, client = served
    _, tokens = cluster
    cards = {}
    for who in ("viewer", "admin"):
        resp = await client.get("/v1/policies", params={"namespace": ns},
                                headers={"Authorization": f"Bearer {tokens[who]}"})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["source"] == "status"
        (cards[who],) = body["policies"]
    card = cards["viewer"]
    assert (card["ref"], card["accepted"], card["programmed"], card["enforced"]) == (f"{ns}/api", True, True, True)
    assert (card["config_version"], card["enforced_sidecars"], card["mode"]) == (4, 2, "enforce")
    assert [t["name"] for t in card["tiers"]] == ["free"]
    assert (cards["viewer"]["may_reset"], cards["admin"]["may_reset"]) == (False, True)
    nobody = await client.get("/v1/policies", params={"namespace": ns},
                              headers={"Authorization": f"Bearer {tokens['nobody']}"})
    assert nobody.status == 403


async def _sign_in(page: Page, url: str, token: str) -> None:
    await page.goto(url)
    await page.fill("#s-token", token)
    await page.click("#signin-form button[type=submit]")


async def test_what_the_page_offers_follows_rbac(served: tuple[str, Client], cluster: Any) -> None:  # noqa: F811
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium as root (hack/ensure-chromium.sh)")
    ns, client = served
    _, tokens = cluster
    view = str(client.make_url(f"/?namespace={ns}&policy={ns}%2Fapi&client=ip%3A10.1.2.3"))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            page.set_default_timeout(20_000)
            await _sign_in(page, view, tokens["nobody"])
            await expect(page.locator("#signin-error")).to_contain_text(f"Not allowed in namespace {ns}")
            for hidden in ("#overview", "#client", "#filters"):
                await expect(page.locator(hidden)).to_be_hidden()
            await page.close()
            for who, offered in (("viewer", False), ("admin", True)):
                page = await browser.new_page()
                page.set_default_timeout(20_000)
                await _sign_in(page, view, tokens[who])
                await expect(page.locator("[data-table=buckets] tbody tr")).to_have_count(1)
                await expect(page.locator(f"[data-policy='{ns}/api']")).to_contain_text("2 sidecars enforce version 4")
                if offered:
                    await expect(page.locator("#reset")).to_be_visible()
                else:
                    await expect(page.locator("#reset")).to_be_hidden()
                await page.close()
        finally:
            await browser.close()
