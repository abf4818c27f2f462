"""The dashboard's page and its two reads (``/v1/overview``, ``/v1/policies``), on SQLite and
PostgreSQL: the page is served with its strict Content-Security-Policy and holds no data; the
overview's totals are exactly what the windows carried (requests per outcome and status,
distinct clients, latency average and p95 from the histogram); the policy cards come from the
config document in Redis and count the fresh heartbeats that run its version; both need the token."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sluice_analytics import dashboard, store
from sluice_analytics.api import ApiContext, routes
from sluice_analytics.auth import TokenFile
from sluice_core import configdoc, configstore, keyschema
from sluice_core.parse import parse_policy
from sluice_core.usage import quantile_us
from sqlalchemy.ext.asyncio import AsyncEngine
from support.analytics_api import AUTH
from support.redis_servers import RedisServer
from support.sidecar_harness import policy_doc
from support.usage_windows import Writer

T0 = 1_789_948_800  # 2026-09-21T00:00:00Z
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def page(engine: AsyncEngine, token_file: str, redis_server: RedisServer) -> AsyncIterator[Client]:
    async with configstore.connect(redis_server.url) as redis:
        app = web.Application()
        ctx = ApiContext(engine, TokenFile(token_file), redis)
        app.add_routes(routes(ctx))
        app.add_routes(dashboard.routes(ctx))
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        yield client
        await client.close()


async def get(client: Client, path: str, **query: Any) -> Any:
    resp = await client.get(path, params={k: str(v) for k, v in query.items()}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_page_is_static_and_locked_down(page: Client) -> None:
    resp = await page.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp
    html = await resp.text()
    assert 'src="static/app.js"' in html and "http" not in html.replace("http-equiv", "")
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = await page.get(f"/static/{name}")
        assert r.status == 200 and r.content_type == ctype
        again = await page.get(f"/static/{name}", headers={"If-None-Match": r.headers["ETag"]})
        assert again.status == 304
    assert (await page.get("/static/../api.py")).status == 404
    assert (await page.get("/static/index.htm")).status == 404


async def test_overview_totals_are_exact(engine: AsyncEngine, page: Client) -> None:
    writer = Writer(sources=3, clients=9, start_ms=(T0 + 3600) * 1000)
    ws = writer.windows(6)
    await store.apply(engine, ws, now_s=T0 + 7200, keep_applied_s=10**9)
    rows = [r for w in ws for r in w.rows]
    body = await get(page, "/v1/overview", namespace="shop", start=T0, end=T0 + 86400, limit=4)
    outcomes: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    for r in rows:
        outcomes[r.outcome] += r.requests
        statuses[r.status] += r.requests
        hist.update(r.histogram)
    assert body["requests"] == sum(r.requests for r in rows)
    assert body["outcomes"] == dict(outcomes) and body["statuses"] == dict(statuses)
    assert body["success"] == statuses["2xx"] + statuses["3xx"]
    assert body["clients"] == len({r.client for r in rows})
    assert body["latency_avg_us"] == sum(r.latency_sum_us for r in rows) // sum(r.latency_count for r in rows)
    p95 = quantile_us(dict(hist), 0.95)
    assert p95 is not None and body["latency_p95_us"] == round(p95)
    per_client: Counter[str] = Counter()
    for r in rows:
        per_client[r.client] += r.requests
    want = sorted(per_client.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    assert [(c["client"], c["requests"]) for c in body["consumers"]] == want
    assert all(c["tiers"] == ["free"] for c in body["consumers"])
    empty = await get(page, "/v1/overview", namespace="elsewhere", start=T0, end=T0 + 3600)
    assert empty["requests"] == 0 and empty["latency_p95_us"] is None and empty["consumers"] == []


async def test_policy_cards_count_the_sidecars_on_the_current_version(page: Client, redis_server: RedisServer) -> None:
    ns = "dash-" + uuid.uuid4().hex[:8]
    api = parse_policy(policy_doc("api", ns, mode="shadow", tiers=[
        {"name": "free", "requests": 5, "period": "1m"}, {"name": "pro", "requests": 100, "period": "1h"}]))
    other = parse_policy(policy_doc("other", ns))
    async with configstore.connect(redis_server.url) as redis:
        version = await configstore.publish(redis, ns, configdoc.build_doc(ns, [api, other]))
        now = time.time()
        beats = {  # two sidecars on the current version of "api", one behind, one gone stale
            keyschema.heartbeat_member(ns, "a", keyschema.Heartbeat(version, now, "api")): now,
            keyschema.heartbeat_member(ns, "b", keyschema.Heartbeat(version, now, "api")): now,
            keyschema.heartbeat_member(ns, "c", keyschema.Heartbeat(version - 1, now, "api")): now,
            keyschema.heartbeat_member(ns, "d", keyschema.Heartbeat(version, now, "other")): now - 300,
        }
        await redis.redis.zadd(keyschema.HEARTBEATS_KEY, beats)
    body = await get(page, "/v1/policies", namespace=ns)
    assert body["source"] == "heartbeats" and body["sidecars"] == 3
    cards = {c["ref"]: c for c in body["policies"]}
    assert set(cards) == {f"{ns}/api", f"{ns}/other"}
    a = cards[f"{ns}/api"]
    assert (a["mode"], a["enforced"], a["enforced_sidecars"], a["config_version"]) == ("shadow", True, 2, version)
    assert [(t["name"], t["requests"], t["period_s"]) for t in a["tiers"]] == [("free", 5, 60.0), ("pro", 100, 3600.0)]
    assert a["may_reset"] is True
    o = cards[f"{ns}/other"]
    assert (o["mode"], o["enforced"], o["enforced_sidecars"]) == ("enforce", False, 0)


async def test_the_reads_need_the_token(page: Client) -> None:
    for path, query in (("/v1/overview", {"namespace": "shop"}), ("/v1/policies", {"namespace": "shop"})):
        assert (await page.get(path, params=query)).status == 401
        bad = await page.get(path, params=query, headers={"Authorization": "Bearer nope"})
        assert bad.status == 401 and bad.content_type == "application/problem+json"
    resp = await page.get("/v1/overview", params={"namespace": "shop", "nope": "1"}, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["param"] == "nope"
