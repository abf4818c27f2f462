"""Decisions that arrive in the same event-loop turn share one script run (per slot on a
Cluster). Batching must not change a single decision: same-key decisions in one batch see each
other's tokens, a refused one in the middle takes nothing, and every caller gets its own reply."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sluice_core import keyschema
from sluice_core.gcra import Reply, expand
from sluice_core.model import Limit
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.stores.memory import MemoryStore
from sluice_sidecar.stores.redis import RedisStore

HOUR = 3_600_000_000


def bucket(limit: Limit, client: str | None = None) -> tuple[tuple[str, ...], tuple[int, int]]:
    tag = keyschema.client_tag("batch/p", client or ("i" + uuid.uuid4().hex))
    return (keyschema.tier_bucket_key(tag, "t", limit.emission_us, limit.capacity_us),), (limit.emission_us, limit.capacity_us)


def remaining(reply: Reply, cost: int, params: tuple[int, int]) -> int:
    """Whole tokens left in a one-bucket decision's bucket."""
    return expand(reply, cost, params).buckets[0].remaining


@pytest.fixture(params=["single", "cluster"])
async def store(request: pytest.FixtureRequest) -> RedisStore:
    server = request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")
    s = RedisStore(parse_redis_url(server.url), timeout=2.0, connect_timeout=0.5)
    yield s  # type: ignore[misc]
    await s.close()


async def test_same_key_decisions_in_one_batch_admit_exactly_the_burst(store: RedisStore) -> None:
    limit = Limit(requests=5, period_us=HOUR, burst=5)
    keys, params = bucket(limit)
    await store.decide(keys, 0, params)  # connect first, so the next 20 go out together
    before = store.batches
    replies = await asyncio.gather(*(store.decide(keys, 1, params) for _ in range(20)))
    assert [r.allowed for r in replies] == [True] * 5 + [False] * 15
    assert [remaining(r, 1, params) for r in replies[:5]] == [4, 3, 2, 1, 0]  # each saw the ones before it
    assert store.batches - before == 1


async def test_refused_decision_inside_a_batch_takes_nothing(store: RedisStore) -> None:
    limit = Limit(requests=4, period_us=HOUR, burst=4)
    keys, params = bucket(limit)
    await store.decide(keys, 0, params)
    replies = await asyncio.gather(store.decide(keys, 3, params), store.decide(keys, 2, params),
                                   store.decide(keys, 1, params))
    assert [r.allowed for r in replies] == [True, False, True]  # the 2-token request did not fit, the 1 did
    assert remaining(await store.decide(keys, 0, params), 0, params) == 0


async def test_mixed_clients_and_bucket_counts_in_one_batch(store: RedisStore) -> None:
    limit = Limit(requests=2, period_us=HOUR, burst=2)
    one = bucket(limit)
    tag = keyschema.client_tag("batch/p", "i" + uuid.uuid4().hex)
    two = ((keyschema.tier_bucket_key(tag, "t", 0, 0), keyschema.rule_bucket_key(tag, "r", 0, 0)),
           (limit.emission_us, limit.capacity_us, limit.emission_us, limit.capacity_us))
    await store.decide(*one[:1], 0, one[1])
    calls = [store.decide(one[0], 1, one[1]), store.decide(two[0], 1, two[1]),
             store.decide(one[0], 1, one[1]), store.decide(two[0], 2, two[1]),
             store.decide(one[0], 1, one[1])]
    replies = await asyncio.gather(*calls)
    assert [len(r.debts) for r in replies] == [1, 2, 1, 2, 1]
    assert [r.allowed for r in replies] == [True, True, True, False, False]


async def test_batched_redis_agrees_with_memory_store(redis_server: object) -> None:
    s = RedisStore(parse_redis_url(redis_server.url), timeout=2.0, connect_timeout=0.5)  # type: ignore[attr-defined]
    mem = MemoryStore()
    limit = Limit(requests=7, period_us=HOUR, burst=7)
    clients = [f"i10.0.0.{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    plan = [(clients[(i * 7) % 4], 1 + (i % 3)) for i in range(60)]
    try:
        got = await asyncio.gather(*(s.decide(*bucket(limit, c)[:1], cost, bucket(limit, c)[1])
                                     for c, cost in plan))
    finally:
        await s.close()
    want = [mem.decide_now(bucket(limit, c)[0], cost, bucket(limit, c)[1]) for c, cost in plan]
    # retry_us: clocks differ
    costs = [cost for _, cost in plan]
    params = bucket(limit)[1]
    assert [(g.allowed, remaining(g, c, params)) for g, c in zip(got, costs, strict=True)] == [
        (w.allowed, remaining(w, c, params)) for w, c in zip(want, costs, strict=True)]
