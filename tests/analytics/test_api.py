"""The analytics API's usage endpoints on SQLite and PostgreSQL: every answer equals what the
test wrote (exact sums), across the minute / hour / day tables; bad parameters are 400
problem+json naming the parameter; the standalone token is required."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sluice_analytics import rollup, store
from sluice_analytics.api import ApiContext
from sluice_analytics.auth import TokenFile
from sluice_core.usage import UsageWindow
from sqlalchemy.ext.asyncio import AsyncEngine
from support.analytics_api import AUTH, TOKEN, api_client
from support.usage_windows import Writer

T0 = 1_789_948_800  # 2026-09-21T00:00:00Z: a whole day, so the day table can serve the range
@pytest.fixture
async def api(engine: AsyncEngine, token_file: str) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await api_client(ApiContext(engine, TokenFile(token_file)))
    yield client
    await client.close()


async def written(engine: AsyncEngine, *, start_ms: int, windows_per_source: int = 12,
                  now: float = T0 + 7 * 86400, run: str = "a") -> list[UsageWindow]:
    """Windows of 10 s from 4 sources (``run``: another set of sidecar processes), from
    ``start_ms``, applied to the store."""
    writer = Writer(sources=4, clients=12, start_ms=start_ms)
    ws = writer.windows(windows_per_source)
    for w in ws:
        w.source += run
    await store.apply(engine, ws, now_s=now if now else time.time(), keep_applied_s=3600 * 24 * 30)
    return ws


def expect(ws: list[UsageWindow], key: Any) -> Counter[Any]:
    out: Counter[Any] = Counter()
    for w in ws:
        for r in w.rows:
            out[key(w, r)] += r.requests
    return out


async def get(api: TestClient[web.Request, web.Application], path: str, **query: Any) -> Any:
    resp = await api.get(path, params={k: str(v) for k, v in query.items()}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_usage_answers_are_exact(engine: AsyncEngine, api: TestClient[web.Request, web.Application]) -> None:
    ws = await written(engine, start_ms=(T0 + 3600) * 1000)
    rng = {"namespace": "shop", "start": T0, "end": T0 + 86400}

    top = await get(api, "/v1/top", **rng, limit=1000)
    assert {c["client"]: c["requests"] for c in top["consumers"]} == expect(ws, lambda w, r: r.client)
    by_limited = await get(api, "/v1/top", **rng, by="limited", limit=3)
    limited = expect(ws, lambda w, r: r.client if r.outcome == "limited" else None)
    del limited[None]
    assert [c["limited"] for c in by_limited["consumers"]] == sorted(limited.values(), reverse=True)[:3]

    series = await get(api, "/v1/series", namespace="shop", start=T0 + 3600, end=T0 + 3600 + 300, step=60)
    assert series["table"] == "minute" and len(series["points"]) == 5
    per_point = expect(ws, lambda w, r: (w.start_ms // 1000 // 60 * 60, r.outcome))
    got = Counter({(p["t"], o): n for p in series["points"] for o, n in p["outcomes"].items()})
    assert got == per_point
    assert sum(p["requests"] for p in series["points"]) == sum(per_point.values())

    endpoints = await get(api, "/v1/endpoints", **rng)
    assert {e["endpoint"]: e["requests"] for e in endpoints["endpoints"]} == expect(ws, lambda w, r: r.endpoint)

    assert (await get(api, "/v1/clients/ip:2001:db8::%2F64", **rng))["requests"] == 0  # a "/" in the id
    one = await get(api, "/v1/clients/key:c3", **rng)
    assert one["outcomes"] == dict(expect(ws, lambda w, r: r.outcome if r.client == "key:c3" else None)
                                   - Counter({None: 10**12}))
    assert one["requests"] == sum(one["outcomes"].values())

    resp = await api.get("/v1/report.csv", params={"namespace": "shop", "from": "2026-09-21", "to": "2026-09-21"},
                         headers=AUTH)
    assert resp.status == 200 and resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert {r["client"]: int(r["requests"]) for r in rows} == expect(ws, lambda w, r: r.client)
    assert {r["day"] for r in rows} == {"2026-09-21"}
    assert sum(int(r["limited"]) for r in rows) == sum(limited.values())


async def test_rolled_up_tables_answer_the_same(engine: AsyncEngine, api: TestClient[web.Request, web.Application]) -> None:
    ws = await written(engine, start_ms=(T0 + 3600) * 1000)
    late = T0 + 3 * 86400
    assert await rollup.roll_up(engine, "hour", now_s=late, delay_s=60) > 0
    assert await rollup.roll_up(engine, "day", now_s=late, delay_s=60) > 0
    # Minutes after the marks: read from the minute table in the same answer.
    after = await written(engine, start_ms=(T0 + 3 * 86400 + 120) * 1000, windows_per_source=3, run="b")
    want = expect(ws + after, lambda w, r: r.client)
    for start, end, step, table in ((T0, T0 + 4 * 86400, 86400, "day"), (T0, T0 + 4 * 86400, 3600, "hour")):
        series = await get(api, "/v1/series", namespace="shop", start=start, end=end, step=step)
        assert series["table"] == table
        assert sum(p["requests"] for p in series["points"]) == sum(want.values())
    top = await get(api, "/v1/top", namespace="shop", start=T0, end=T0 + 4 * 86400, limit=100)
    assert {c["client"]: c["requests"] for c in top["consumers"]} == want


async def test_limited_now_names_policy_tier_and_endpoint(
        engine: AsyncEngine, api: TestClient[web.Request, web.Application]) -> None:
    now = int(time.time())
    ws = await written(engine, start_ms=(now - 120) * 1000, windows_per_source=3, now=now)
    body = await get(api, "/v1/limited", namespace="shop", minutes=10, limit=1000)
    want = expect(ws, lambda w, r: (r.client, r.policy, r.tier, r.endpoint) if r.outcome == "limited" else None)
    del want[None]
    assert {(c["client"], c["policy"], c["tier"], c["endpoint"]): c["limited"] for c in body["clients"]} == want
    other = await get(api, "/v1/limited", namespace="elsewhere")
    assert other["clients"] == []


BAD = [
    ("/v1/top", {"start": "yesterday"}, "start"),
    ("/v1/top", {"end": "2026-09-22T00:00:00"}, "end"),
    ("/v1/top", {"start": T0 + 600, "end": T0}, "end"),
    ("/v1/top", {"start": T0 + 60, "end": T0 + 60 + 500 * 86400}, "start"),
    ("/v1/series", {"start": T0 + 60, "end": T0 + 60 + 49 * 3600, "step": "3m"}, "step"),  # 1,000 points, 3,000 minutes
    ("/v1/top", {"start": T0, "end": T0 + 3000 * 86400}, "start"),
    ("/v1/top", {"by": "bytes"}, "by"),
    ("/v1/top", {"limit": "0"}, "limit"),
    ("/v1/top", {"limit": "100000"}, "limit"),
    ("/v1/top", {"limit": "\u00b2"}, "limit"),  # a digit to str.isdigit, not to int()
    ("/v1/top", {"start": "\u00b9\u00b2"}, "start"),
    ("/v1/limited", {"minutes": "\u0663"}, "minutes"),
    ("/v1/top", {"colour": "red"}, "colour"),
    ("/v1/top", {"namespace": ""}, "namespace"),
    ("/v1/top", {"policy": "other/x"}, "policy"),
    ("/v1/series", {"start": T0, "end": T0 + 86400, "step": "60"}, "step"),
    ("/v1/series", {"step": "90"}, "step"),
    ("/v1/series", {"step": "soon"}, "step"),
    ("/v1/limited", {"minutes": "1000"}, "minutes"),
    ("/v1/report.csv", {"from": "2026-09-22"}, "to"),
    ("/v1/report.csv", {"from": "2026-13-01", "to": "2026-09-22"}, "from"),
    ("/v1/report.csv", {"from": "2025-01-01", "to": "2026-09-22"}, "to"),
    ("/v1/buckets", {"policy": "api"}, "client"),
    ("/v1/buckets", {"policy": "api", "client": "mac:00:11"}, "client"),
]


@pytest.mark.parametrize(("path", "query", "param"), BAD)
async def test_bad_parameters_are_named(api: TestClient[web.Request, web.Application], path: str,
                                        query: dict[str, Any], param: str) -> None:
    q = {"namespace": "shop", **{k: str(v) for k, v in query.items()}}
    resp = await api.get(path, params=q, headers=AUTH)
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["param"] == param and body["status"] == 400 and body["detail"]


async def test_the_token_file_guards_every_call(engine: AsyncEngine, api: TestClient[web.Request, web.Application]) -> None:
    q = {"namespace": "shop"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        resp = await api.get("/v1/top", params=q, headers=headers)
        assert resp.status == 401 and resp.content_type == "application/problem+json"
        assert TOKEN not in await resp.text()
    assert (await api.get("/v1/top", params=q, headers=AUTH)).status == 200
    assert (await api.get("/openapi.json")).status == 200  # the document is public
    off = await api_client(ApiContext(engine, TokenFile(None)))
    try:
        assert (await off.get("/v1/top", params=q, headers=AUTH)).status == 401
    finally:
        await off.close()


async def test_times_past_2038(api: TestClient[web.Request, web.Application]) -> None:
    """Unix seconds past 2^31 (PostgreSQL would refuse them as INTEGER parameters)."""
    t = 4_102_444_800  # 2100-01-01
    series = await get(api, "/v1/series", namespace="shop", start=t, end=t + 3600, step=60)
    assert len(series["points"]) == 60 and all(p["requests"] == 0 for p in series["points"])
