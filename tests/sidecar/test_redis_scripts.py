"""The decision script and a Redis whose script cache is empty (restarted, ``SCRIPT FLUSH``): a new
connection loads the script before carrying any decision, and batches pipelined behind one that
met ``NOSCRIPT`` are all sent again, none failed."""

from __future__ import annotations

import asyncio
import uuid

from sluice_core import keyschema
from sluice_core.model import Limit
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.stores.base import StoreUnavailable
from sluice_sidecar.stores.redis import RedisStore
from support.redis_servers import RedisServer

LIMIT = Limit(requests=100, period_us=3600 * 10**6, burst=100)
PARAMS = (LIMIT.emission_us, LIMIT.capacity_us)


def bucket() -> str:
    tag = keyschema.client_tag(f"t-{uuid.uuid4().hex[:8]}/p", keyschema.short_digest(uuid.uuid4().hex))
    return keyschema.tier_bucket_key(tag, "free", 0, 0)


def noscript_errors(server: RedisServer) -> int:
    stats = server.client().info("errorstats")
    return int(stats.get("errorstat_NOSCRIPT", {}).get("count", 0))


async def test_a_reconnect_loads_the_script_before_any_decision(fresh_redis: RedisServer) -> None:
    store = RedisStore(parse_redis_url(fresh_redis.url), timeout=1.0, connect_timeout=1.0)
    try:
        assert (await store.decide((bucket(),), 1, PARAMS)).allowed
        fresh_redis.restart()  # empty script cache; the store's connection is gone
        replies = []
        for _ in range(100):  # the first decisions after the restart may meet the lost connection
            try:
                replies = await asyncio.gather(*(store.decide((bucket(),), 1, PARAMS) for _ in range(200)))
                break
            except StoreUnavailable:  # the lost connection, noticed: retried until reconnected
                await asyncio.sleep(0.02)
        assert [r.allowed for r in replies] == [True] * 200
        assert noscript_errors(fresh_redis) == 0
    finally:
        await store.close()


async def test_every_batch_pipelined_behind_noscript_is_retried(fresh_redis: RedisServer) -> None:
    store = RedisStore(parse_redis_url(fresh_redis.url), timeout=1.0, connect_timeout=1.0, max_batch=4)
    try:
        assert (await store.decide((bucket(),), 1, PARAMS)).allowed
        fresh_redis.execute("SCRIPT", "FLUSH")  # same connection, empty cache
        batches = store.batches
        replies = await asyncio.gather(*(store.decide((bucket(),), 1, PARAMS) for _ in range(64)),
                                       return_exceptions=True)
        assert store.batches - batches >= 16  # 16 batches of 4, pipelined on one connection
        assert [r if isinstance(r, BaseException) else r.allowed for r in replies] == [True] * 64
        assert noscript_errors(fresh_redis) >= 1  # they did meet NOSCRIPT
    finally:
        await store.close()
