"""The usage summary for ``status.usage``: windows as sidecars write them go through the real
collector (stream -> SQLite / PostgreSQL -> summary) into Redis (single and the 3-master
Cluster); what the operator reads back is exact for the last hour, bounded, and safe to show
(client ids from requests are attacker-chosen), and says when it left policies out."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sluice_analytics.collector import Collector
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.schema import usage_minute
from sluice_analytics.settings import AnalyticsSettings
from sluice_analytics.stream import UsageStream
from sluice_core import configstore, keyschema, usagesummary
from sluice_core.usage import OTHER, UsageRow, UsageWindow
from sqlalchemy.ext.asyncio import AsyncEngine
from support.usage_windows import xadd

HOSTILE = "key:\x1b]0;pwned\x07$(rm -rf ~)`id`;'\"<script>" + "A" * 300  # a keys-file id: anything printable


def row(policy: str, client: str, outcome: str, n: int) -> UsageRow:
    return UsageRow(policy, client, "free", "/x", outcome, "none" if outcome == "limited" else "2xx", n, n)


def windows(ns: str, now_ms: int) -> list[UsageWindow]:
    """Two sidecars' windows: one in the last hour each, and one from two hours ago (outside)."""
    hostile = "".join(c for c in HOSTILE if c.isprintable() and c.isascii())[:256]
    recent = [row(f"{ns}/api", "ip:10.0.0.1", "allowed", 50), row(f"{ns}/api", "ip:10.0.0.1", "limited", 7),
              row(f"{ns}/api", "ip:10.0.0.2", "limited", 9), row(f"{ns}/api", hostile, "limited", 8),
              row(f"{ns}/api", "header:abc", "limited", 1), row(f"{ns}/api", OTHER, "limited", 500),
              row(f"{ns}/api", "key:acme", "shadow_limited", 4), row("partners", "key:acme", "allowed", 3),
              row("", "anonymous", "skipped", 11)]
    return [UsageWindow("pod-a/1", 0, ns, now_ms - 60_000, now_ms - 50_000, recent[:5]),
            UsageWindow("pod-b/1", 0, ns, now_ms - 30_000, now_ms - 20_000, recent[5:]),
            UsageWindow("pod-a/1", 1, ns, now_ms - 7_200_000, now_ms - 7_190_000,
                        [row(f"{ns}/api", "ip:10.9.9.9", "limited", 1000)])]


def collector(url: str, engine: AsyncEngine, client: configstore.Client, consumer: str,
              now_s: float) -> Collector:
    settings = AnalyticsSettings(redis=url, consumer=consumer, block_ms=100)
    return Collector(settings, engine, UsageStream(client, consumer, block_ms=100, claim_idle_s=60),
                     AnalyticsMetrics(), clock=lambda: now_s)


def mid_minute() -> float:
    """Now, moved to 37.25 s into its minute: neither a minute's start nor a whole second."""
    return time.time() // 60 * 60 + 37.25


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("server", ["single", "cluster"])
async def test_summary_is_exact_bounded_and_safe(server: str, engine: AsyncEngine, request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue("fresh_redis" if server == "single" else "redis_cluster").url)
    ns = "sum-" + uuid.uuid4().hex[:6]
    async with configstore.connect(url) as client:
        await client.redis.delete(keyschema.USAGE_SUMMARY_KEY, keyschema.USAGE_SUMMARY_LOCK_KEY)
        assert await usagesummary.read(client, [f"{ns}/api"]) is None  # no collector: no summary
        now_s = mid_minute()
        await xadd(client.redis, windows(ns, int(now_s * 1000)))
        one = collector(url, engine, client, "one", now_s)
        while await one.step():
            pass
        assert await one.summarise_once() is not None
        got = await usagesummary.read(client, [f"{ns}/api", "partners", f"{ns}/idle"])
        assert got is not None and got.at == int(now_s) and not got.truncated  # when it was computed
        api = got.policies[f"{ns}/api"]
        # The last hour only (not the window two hours back); (other) is no client.
        assert (api.requests, api.limited) == (50 + 7 + 9 + 8 + 1 + 500 + 4, 7 + 9 + 8 + 1 + 500)
        (c1, n1), (c2, n2), (c3, n3) = api.top
        assert (c1, n1) == ("ip:10.0.0.2", 9) and (n2, n3) == (8, 7) and c3 == "ip:10.0.0.1"
        assert len(c2) == usagesummary.MAX_CLIENT and c2.startswith("key:") and c2.endswith("...")
        assert set(c2) <= usagesummary.CLIENT_CHARS
        assert got.policies["partners"] == usagesummary.PolicySummary(3, 0, ())
        assert f"{ns}/idle" not in got.policies  # no traffic: the reader shows zeros
        assert "" not in (await client.redis.hkeys(keyschema.USAGE_SUMMARY_KEY))  # skipped: no policy
        ttl_ms = await client.redis.pttl(keyschema.USAGE_SUMMARY_KEY)
        assert 0 < ttl_ms <= usagesummary.TTL_S * 1000  # a stopped collector's summary expires

        # A second replica leaves the interval's summary to the first; the first may write again.
        two = collector(url, engine, client, "two", now_s)
        assert await two.summarise_once() is None
        assert await one.summarise_once() is not None


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_more_policies_than_a_summary_holds_mark_it_truncated(engine: AsyncEngine, fresh_redis: Any) -> None:
    """MAX_POLICIES + 1 policies with traffic in the last hour: the summary holds the busiest
    MAX_POLICIES and says it is truncated (the operator then leaves the others' status alone)."""
    now_s = mid_minute()
    minute = int(now_s) // 60 * 60
    n = usagesummary.MAX_POLICIES + 1
    zero = {c.name: 0 for c in usage_minute.columns if c.name not in ("ts", "policy", "requests") and not c.primary_key}
    rows = [{"ts": minute, "namespace": "big", "policy": f"big/p{i:05d}", "client": "ip:10.0.0.1", "tier": "free",
             "endpoint": "/x", "outcome": "allowed", "status": "2xx", **zero, "requests": 2 + i} for i in range(n)]
    async with engine.begin() as conn:
        await conn.execute(usage_minute.insert(), rows)
    async with configstore.connect(fresh_redis.url) as client:
        assert await collector(fresh_redis.url, engine, client, "one", now_s).summarise_once() == n - 1
        got = await usagesummary.read(client, ["big/p00000", "big/p00001", f"big/p{n - 1:05d}"])
        assert got is not None and got.truncated and got.at == int(now_s)
        assert list(got.policies) == ["big/p00001", f"big/p{n - 1:05d}"]  # the least busy left out
        await client.redis.delete(keyschema.USAGE_SUMMARY_LOCK_KEY)
        async with engine.begin() as conn:
            await conn.execute(usage_minute.delete().where(usage_minute.c.policy == "big/p00000"))
        assert await collector(fresh_redis.url, engine, client, "one", now_s).summarise_once() == n - 1
        got = await usagesummary.read(client, ["big/p00000"])
        assert got is not None and not got.truncated and got.policies == {}


async def test_reader_trusts_nothing_in_redis(fresh_redis: Any) -> None:
    """Whoever can write Redis could put anything in the hash: the reader shows nothing it
    would not write itself (bad fields read as no traffic, ids re-reduced, no huge values)."""
    async with configstore.connect(fresh_redis.url) as client:
        await client.redis.hset(keyschema.USAGE_SUMMARY_KEY, mapping={
            "@": '{"v":1,"at":1790000000,"window_s":3600}',
            "a/ok": '{"requests":5,"limited":2,"top":[["ip:1.2.3.4\\u001b[31m",2]]}',
            "a/many": '{"requests":5,"limited":2,"top":[["a",1],["b",1],["c",1],["d",1]]}',
            "a/neg": '{"requests":-1,"limited":0,"top":[]}',
            "a/big": '{"requests":5,"limited":2,"top":[["' + "x" * 5000 + '",2]]}',
            "a/text": "not json"})
        got = await usagesummary.read(client, ["a/ok", "a/many", "a/neg", "a/big", "a/text"])
        assert got is not None and got.at == 1790000000
        assert got.policies == {"a/ok": usagesummary.PolicySummary(5, 2, (("ip:1.2.3.4__31m", 2),))}
        await client.redis.hset(keyschema.USAGE_SUMMARY_KEY, "@", '{"v":2}')
        assert await usagesummary.read(client, ["a/ok"]) is None  # an encoding it does not know
        await client.redis.hset(keyschema.USAGE_SUMMARY_KEY, "@", '{"v":1,"at":1,"truncated":"no"}')
        odd = await usagesummary.read(client, ["a/ok"])
        assert odd is not None and odd.truncated  # not a bool: absent policies are unknown, not idle


def test_display_client_bounds_and_alphabet() -> None:
    assert usagesummary.display_client("ip:2001:db8::/48") == "ip:2001:db8::/48"
    assert usagesummary.display_client("key:shop/acme-prod") == "key:shop/acme-prod"
    assert usagesummary.display_client("") == "_"
    long = usagesummary.display_client("key:" + "é" * 10_000_000)
    assert len(long) == usagesummary.MAX_CLIENT and long.endswith("...") and long.isascii()
