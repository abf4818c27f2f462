"""The usage summary for ``status.usage``: windows as sidecars write them go through the real
collector (stream -> SQLite / PostgreSQL -> summary) into Redis (single and the 3-master
Cluster); what the operator reads back is exact for the last hour, bounded, and safe to show
(client ids from requests are attacker-chosen)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from sluice_analytics.collector import Collector
from sluice_analytics.metrics import AnalyticsMetrics
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


def collector(url: str, engine: AsyncEngine, client: configstore.Client, consumer: str) -> Collector:
    settings = AnalyticsSettings(redis=url, consumer=consumer, block_ms=100)
    return Collector(settings, engine, UsageStream(client, consumer, block_ms=100, claim_idle_s=60),
                     AnalyticsMetrics())


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("server", ["single", "cluster"])
async def test_summary_is_exact_bounded_and_safe(server: str, engine: AsyncEngine, request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue("fresh_redis" if server == "single" else "redis_cluster").url)
    ns = "sum-" + uuid.uuid4().hex[:6]
    async with configstore.connect(url) as client:
        await client.redis.delete(keyschema.USAGE_SUMMARY_KEY, keyschema.USAGE_SUMMARY_LOCK_KEY)
        assert await usagesummary.read(client, [f"{ns}/api"]) is None  # no collector: no summary
        await xadd(client.redis, windows(ns, int(time.time() * 1000)))
        one = collector(url, engine, client, "one")
        while await one.step():
            pass
        assert await one.summarise_once() is not None
        got = await usagesummary.read(client, [f"{ns}/api", "partners", f"{ns}/idle"])
        assert got is not None and abs(got.at - time.time()) < 3600
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
        two = collector(url, engine, client, "two")
        assert await two.summarise_once() is None
        assert await one.summarise_once() is not None


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


def test_display_client_bounds_and_alphabet() -> None:
    assert usagesummary.display_client("ip:2001:db8::/48") == "ip:2001:db8::/48"
    assert usagesummary.display_client("key:shop/acme-prod") == "key:shop/acme-prod"
    assert usagesummary.display_client("") == "_"
    long = usagesummary.display_client("key:" + "é" * 10_000_000)
    assert len(long) == usagesummary.MAX_CLIENT and long.endswith("...") and long.isascii()
