"""The operator warns when the Redis it writes to would refuse decisions (``noeviction``) or could
evict config documents (``allkeys-*``) once at ``maxmemory``: read with CONFIG GET, or INFO memory
where CONFIG is disabled (managed Redis), against real redis-servers configured each way."""

from __future__ import annotations

import logging

import pytest
from sluice_core import configstore
from sluice_operator.metrics import OperatorMetrics
from sluice_operator.redischeck import MemoryPolicyCheck
from support.redis_servers import RedisServer


@pytest.mark.parametrize(("maxmemory", "policy", "warned"), [
    ("100mb", "noeviction", "noeviction"),
    ("100mb", "allkeys-lru", "allkeys-lru"),
    ("100mb", "allkeys-random", "allkeys-random"),
    ("100mb", "volatile-ttl", None),
    ("100mb", "volatile-lru", None),
    ("0", "noeviction", None),  # no maxmemory: nothing is refused or evicted
])
async def test_each_policy(fresh_redis: RedisServer, maxmemory: str, policy: str, warned: str | None,
                           caplog: pytest.LogCaptureFixture) -> None:
    fresh_redis.execute("CONFIG", "SET", "maxmemory", maxmemory)
    fresh_redis.execute("CONFIG", "SET", "maxmemory-policy", policy)
    metrics = OperatorMetrics()
    async with configstore.connect(fresh_redis.url) as client:
        check = MemoryPolicyCheck(client, metrics)
        caplog.set_level(logging.INFO, logger="sluice")
        found = await check.run()
        assert await check.run() == found  # read again: the same, not logged again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    gauge = metrics.registry.get_sample_value("sluice_operator_redis_eviction_unsafe")
    if warned is None:
        assert found is None and warnings == [] and gauge == 0
    else:
        assert found is not None and warned in found
        assert len(warnings) == 1 and warned in warnings[0] and "volatile-ttl" in warnings[0]
        assert gauge == 1


async def test_config_disabled_falls_back_to_info_and_warns_once_per_change(
        caplog: pytest.LogCaptureFixture) -> None:
    # A managed Redis: CONFIG renamed away, the policy set at start.
    with RedisServer(extra_args=["--maxmemory", "100mb", "--maxmemory-policy", "noeviction",
                                 "--rename-command", "CONFIG", "sluice-test-config"]) as r:
        async with configstore.connect(r.url) as client:
            check = MemoryPolicyCheck(client, OperatorMetrics())
            caplog.set_level(logging.INFO, logger="sluice")
            assert "noeviction" in (await check.run() or "")
            assert "noeviction" in (await check.run() or "")
            r.execute("sluice-test-config", "SET", "maxmemory-policy", "volatile-ttl")
            assert await check.run() is None
            # Unsafe again, but read recently: not read again, so the (stale) safe answer stays ...
            r.execute("sluice-test-config", "SET", "maxmemory-policy", "allkeys-lru")
            assert await check.run(max_age=3600) is None
            # ... until it is due: then the change is seen (a re-read above would have seen it too).
            assert "allkeys-lru" in (await check.run() or "")
    # Sluice's own lines only: an earlier test's garbage (aiohttp's "Unclosed client session",
    # logged by asyncio when the collector finds it) may land in any test's capture.
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("sluice")]
    assert [lvl for lvl, _ in messages] == [logging.WARNING, logging.INFO, logging.WARNING], messages
    assert "noeviction" in messages[0][1] and "safe" in messages[1][1] and "allkeys-lru" in messages[2][1]
