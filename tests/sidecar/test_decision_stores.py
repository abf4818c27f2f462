"""The same decision scenarios on every store: MemoryStore, RedisStore on one Redis, RedisStore on
a 3-master Redis Cluster.

Redis decides with its own clock (``TIME``), so these tests use real time: limits whose period
is an hour where refill must not matter, short periods polled with a deadline where it must.
Every test uses fresh keys (uuid), built with :mod:`sluice_core.keyschema`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from sluice_core import keyschema, scripts
from sluice_core.gcra import BucketState, Decision, Reply, expand
from sluice_core.model import Limit
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.stores.base import DecisionStore, StoreUnavailable
from sluice_sidecar.stores.memory import MemoryStore
from sluice_sidecar.stores.redis import RedisStore
from sluice_sidecar.transport.topology import key_slot
from support.redis_servers import RedisClusterProcs, RedisServer, pick_port

HOUR_US = 3600 * 10**6


def hourly(burst: int, requests: int = 1) -> Limit:
    """A limit whose refill during a test is negligible (a token per hour / requests)."""
    return Limit(requests=requests, period_us=HOUR_US, burst=burst)


@dataclass
class Case:
    kind: str  # memory | redis | cluster
    store: DecisionStore
    node_for: Callable[[str], RedisServer] | None = None  # the node that holds a key
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def is_redis(self) -> bool:
        return self.kind != "memory"


@dataclass
class Client:
    tier_key: str
    rule_key: str


def new_client(policy: str | None = None) -> Client:
    ref = policy or f"test-{uuid.uuid4().hex[:8]}/policy"
    tag = keyschema.client_tag(ref, keyschema.short_digest(uuid.uuid4().hex))
    # The limit tag in a key only has to be stable here: each test passes its own numbers.
    return Client(keyschema.tier_bucket_key(tag, "free", 0, 0), keyschema.rule_bucket_key(tag, "search", 0, 0))


async def decide(store: DecisionStore, buckets: list[tuple[str, Limit]], cost: int) -> Decision:
    params = tuple(x for _, lim in buckets for x in (lim.emission_us, lim.capacity_us))
    reply = await store.decide(tuple(k for k, _ in buckets), cost, params)
    assert isinstance(reply, Reply) and type(reply.allowed) is bool, reply
    assert len(reply.debts) == len(buckets) and all(type(x) is int for x in reply.debts), reply
    decision = expand(reply, cost, params)
    assert type(decision.retry_us) is int, decision
    return decision


def head(d: Decision) -> tuple[bool, int, int]:
    """Allowed, retry_us and the first bucket's remaining tokens."""
    return d.allowed, d.retry_us, d.buckets[0].remaining


def remaining(d: Decision) -> tuple[int, ...]:
    return tuple(b.remaining for b in d.buckets)


def cluster_node_for(cluster: RedisClusterProcs) -> Callable[[str], RedisServer]:
    owners = cluster.slot_owners()
    return lambda key: cluster.node_by_port(owners[key_slot(key)])


def make_case(request: pytest.FixtureRequest, kind: str) -> Case:
    if kind == "memory":
        return Case("memory", MemoryStore())
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Case("redis", RedisStore(parse_redis_url(server.url), timeout=1.0, connect_timeout=0.5),
                    node_for=lambda _key: server, nodes=[server])
    cluster: RedisClusterProcs = request.getfixturevalue("redis_cluster")
    return Case("cluster", RedisStore(parse_redis_url(cluster.url), timeout=1.0, connect_timeout=0.5),
                node_for=cluster_node_for(cluster), nodes=list(cluster.nodes))


@pytest.fixture(params=["memory", "redis", pytest.param("cluster", marks=pytest.mark.cluster)])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[Case]:
    c = make_case(request, request.param)
    try:
        yield c
    finally:
        await c.store.close()


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.cluster)])
async def redis_case(request: pytest.FixtureRequest) -> AsyncIterator[Case]:
    """Only the Redis-backed stores (TTL, scripts, server-side memory)."""
    c = make_case(request, request.param)
    try:
        yield c
    finally:
        await c.store.close()


# Scenarios on every store -----------------------------------------------------------------------
async def test_burst_admitted_then_refused(case: Case) -> None:
    lim = hourly(burst=5)
    key = new_client().tier_key
    for i in range(5):
        allowed, retry, ((left, next_us, full_us),) = await decide(case.store, [(key, lim)], 1)
        assert (allowed, retry, left) == (True, 0, 4 - i)
        assert 0 < next_us <= lim.emission_us
        # exact up to the time elapsed since the first call (well under 10 s)
        assert (i + 1) * lim.emission_us - 10**7 < full_us <= (i + 1) * lim.emission_us
    for _ in range(3):
        allowed, retry, ((left, _, full_us),) = await decide(case.store, [(key, lim)], 1)
        assert (allowed, left) == (False, 0)
        assert 0 < retry <= lim.emission_us
        assert lim.capacity_us - 10**7 < full_us <= lim.capacity_us


async def test_the_whole_burst_in_one_request(case: Case) -> None:
    """Edge of the bucket within one script run (one clock reading): cost == burst fits a
    full bucket exactly, cost == burst + 1 never does."""
    lim = hourly(burst=4)
    key = new_client().tier_key
    reply = await decide(case.store, [(key, lim)], 5)
    assert head(reply) == (False, lim.emission_us, 4)
    assert await decide(case.store, [(key, lim)], 4) == Decision(
        True, 0, (BucketState(0, lim.emission_us, lim.capacity_us),))


async def test_refusal_consumes_nothing(case: Case) -> None:
    lim = hourly(burst=5)
    key = new_client().tier_key
    assert head(await decide(case.store, [(key, lim)], 3)) == (True, 0, 2)
    for _ in range(5):
        reply = await decide(case.store, [(key, lim)], 3)
        assert not reply.allowed and reply.buckets[0].remaining == 2, reply
    assert head(await decide(case.store, [(key, lim)], 2)) == (True, 0, 0)
    assert not (await decide(case.store, [(key, lim)], 1)).allowed


async def test_a_refund_gives_back_exactly_what_was_taken(case: Case) -> None:
    """A negative cost (a request one policy admitted and another refused, on Redis Cluster)
    returns the tokens: always allowed, never more than a full bucket, and a bucket it makes
    full again is no key at all."""
    tier, rule = hourly(burst=5), hourly(burst=2)
    c = new_client()
    both = [(c.tier_key, tier), (c.rule_key, rule)]
    assert head(await decide(case.store, both, 2)) == (True, 0, 3)
    assert head(await decide(case.store, [(c.tier_key, tier)], 1)) == (True, 0, 2)
    assert (await decide(case.store, both, -2)).allowed
    assert (await decide(case.store, [(c.tier_key, tier)], 0)).buckets[0].remaining == 4  # the other request's token stays taken
    assert (await decide(case.store, [(c.rule_key, rule)], 0)).buckets[0].remaining == 2
    assert (await decide(case.store, both, -3)).allowed  # more than was taken: a full bucket, no more
    assert (await decide(case.store, [(c.tier_key, tier)], 0)).buckets[0].remaining == 5
    assert head(await decide(case.store, both, 2)) == (True, 0, 3)  # and the bucket works as before
    if case.is_redis:
        assert case.node_for is not None
        assert case.node_for(c.tier_key).execute("EXISTS", c.tier_key) == 1
        await decide(case.store, both, -2)
        assert case.node_for(c.tier_key).execute("EXISTS", c.tier_key, c.rule_key) == 0


async def test_cost_takes_that_many_tokens(case: Case) -> None:
    lim = hourly(burst=10)
    key = new_client().tier_key
    reply = await decide(case.store, [(key, lim)], 3)
    # one script run: exact
    assert reply == Decision(True, 0, (BucketState(7, lim.emission_us, 3 * lim.emission_us),))
    assert head(await decide(case.store, [(key, lim)], 7)) == (True, 0, 0)
    allowed, retry, ((left, _, full_us),) = await decide(case.store, [(key, lim)], 1)
    assert (allowed, left) == (False, 0)
    assert 0 < retry <= lim.emission_us
    assert full_us > lim.capacity_us - 10**7


async def test_two_buckets_all_or_nothing(case: Case) -> None:
    tier, rule = hourly(burst=5), hourly(burst=2)
    c = new_client()
    both = [(c.tier_key, tier), (c.rule_key, rule)]
    first = await decide(case.store, both, 1)
    assert first == Decision(True, 0, (BucketState(4, tier.emission_us, tier.emission_us),
                                       BucketState(1, rule.emission_us, rule.emission_us)))
    assert (await decide(case.store, both, 1)).allowed
    # The rule bucket is empty: refused, and the tier bucket keeps its 3 tokens.
    reply = await decide(case.store, both, 1)
    assert not reply.allowed and remaining(reply) == (3, 0), reply
    assert (await decide(case.store, [(c.tier_key, tier)], 0)).buckets[0].remaining == 3
    # A cost that fits the tier but not the rule: nothing taken from the tier either.
    assert not (await decide(case.store, both, 2)).allowed
    assert (await decide(case.store, [(c.tier_key, tier)], 0)).buckets[0].remaining == 3
    # The tier bucket alone still works.
    assert head(await decide(case.store, [(c.tier_key, tier)], 3)) == (True, 0, 0)
    # And the other way round: the tier is empty, the rule bucket (fresh client) is not touched.
    d = new_client()
    small_tier, big_rule = hourly(burst=1), hourly(burst=4)
    pair = [(d.tier_key, small_tier), (d.rule_key, big_rule)]
    assert (await decide(case.store, pair, 1)).allowed
    reply = await decide(case.store, pair, 1)
    assert not reply.allowed and reply.buckets[1].remaining == 3, reply
    assert (await decide(case.store, [(d.rule_key, big_rule)], 0)).buckets[0].remaining == 3


async def test_reply_shape(case: Case) -> None:
    c = new_client()
    lims = [hourly(burst=3), hourly(burst=7, requests=2)]
    keys = [c.tier_key, c.rule_key]
    # A fresh bucket, one token taken: every field is exact (one script run, one clock reading).
    for n in (1, 2):
        cc = new_client()
        buckets = list(zip([cc.tier_key, cc.rule_key][:n], lims[:n], strict=True))
        reply = await decide(case.store, buckets, 1)
        expect = Decision(True, 0, tuple(BucketState(lim.burst - 1, lim.emission_us, lim.emission_us)
                                         for lim in lims[:n]))
        assert reply == expect
    # Refused: allowed 0, retry within one emission interval of the fullest need.
    buckets = list(zip(keys, lims, strict=True))
    assert (await decide(case.store, buckets, 3)).allowed
    allowed, retry, ((r1, n1, f1), (r2, n2, f2)) = await decide(case.store, buckets, 1)
    assert not allowed
    assert 0 < retry <= lims[0].emission_us
    assert (r1, r2) == (0, 4)
    assert 0 < n1 <= lims[0].emission_us and 0 < n2 <= lims[1].emission_us
    assert 0 < f1 <= lims[0].capacity_us and 0 < f2 <= 3 * lims[1].emission_us


async def test_cost_zero_writes_nothing(case: Case) -> None:
    c = new_client()
    lim = hourly(burst=4)
    before = len(case.store) if isinstance(case.store, MemoryStore) else None
    for _ in range(3):
        reply = await decide(case.store, [(c.tier_key, lim), (c.rule_key, lim)], 0)
        assert reply == Decision(True, 0, (BucketState(4, 0, 0), BucketState(4, 0, 0)))
    if isinstance(case.store, MemoryStore):
        assert len(case.store) == before
    else:
        assert case.node_for is not None
        node = case.node_for(c.tier_key)
        assert node.execute("EXISTS", c.tier_key, c.rule_key) == 0
    # A peek after a real request reads without changing anything.
    await decide(case.store, [(c.tier_key, lim)], 1)
    p1 = await decide(case.store, [(c.tier_key, lim)], 0)
    p2 = await decide(case.store, [(c.tier_key, lim)], 0)
    assert p1.buckets[0].remaining == p2.buckets[0].remaining == 3


async def test_refill_in_real_time(case: Case) -> None:
    """A short period, real clocks: refused now, admitted again once the promised wait is over
    (and not before it: the wait between our send and our receipt covers retry_us)."""
    lim = Limit(requests=20, period_us=10**6, burst=2)  # a token every 50 ms
    key = new_client().tier_key
    assert (await decide(case.store, [(key, lim)], 2)).allowed
    sent = time.time()
    allowed, retry, _ = await decide(case.store, [(key, lim)], 1)
    assert not allowed and 0 < retry <= lim.emission_us
    deadline = time.monotonic() + 5.0
    while True:
        allowed = (await decide(case.store, [(key, lim)], 1)).allowed
        if allowed:
            break
        assert time.monotonic() < deadline, "the bucket never refilled"
        await asyncio.sleep(0.005)
    waited_us = (time.time() - sent) * 1e6
    assert waited_us >= retry - 1000, (waited_us, retry)  # 1 ms: clock granularity


# Redis-only behaviour ---------------------------------------------------------------------------
async def test_bucket_keys_have_a_ttl(redis_case: Case) -> None:
    lim = Limit(requests=10, period_us=10 * 10**6, burst=5)  # em = 1 s
    c = new_client()
    t0 = time.monotonic()
    reply = await decide(redis_case.store, [(c.tier_key, lim), (c.rule_key, lim)], 2)
    assert reply.allowed
    assert redis_case.node_for is not None
    for key, full_us in ((c.tier_key, reply.buckets[0].full_us), (c.rule_key, reply.buckets[1].full_us)):
        pttl = redis_case.node_for(key).execute("PTTL", key)
        elapsed_ms = (time.monotonic() - t0) * 1000
        # set to full_us/1000 + 1000 ms when written, counting down since
        assert 0 < pttl <= full_us // 1000 + 1000
        # and never shorter than the time until the bucket is full again
        assert pttl >= full_us / 1000 - elapsed_ms
        assert pttl >= full_us // 1000 + 1000 - elapsed_ms - 5
    # Refused requests write nothing, so they do not extend the TTL.
    lim1 = hourly(burst=1)
    k = new_client().tier_key
    await decide(redis_case.store, [(k, lim1)], 1)
    node = redis_case.node_for(k)
    p1 = node.execute("PTTL", k)
    assert 0 < p1 <= lim1.emission_us // 1000 + 1000
    assert not (await decide(redis_case.store, [(k, lim1)], 1)).allowed
    assert node.execute("PTTL", k) <= p1


async def test_noscript_recovery(redis_case: Case) -> None:
    lim = hourly(burst=3)
    key = new_client().tier_key
    assert head(await decide(redis_case.store, [(key, lim)], 1)) == (True, 0, 2)
    for node in redis_case.nodes:
        node.execute("SCRIPT", "FLUSH")
    sha = scripts.decide().sha1
    assert redis_case.node_for is not None
    assert not any(redis_case.node_for(key).execute("SCRIPT", "EXISTS", sha))
    assert head(await decide(redis_case.store, [(key, lim)], 1)) == (True, 0, 1)
    assert all(redis_case.node_for(key).execute("SCRIPT", "EXISTS", sha))


@pytest.mark.cluster
async def test_cluster_slots_and_spread(redis_cluster: RedisClusterProcs) -> None:
    # key_slot agrees with the server for keyschema keys and for the tricky spellings.
    rng = random.Random(7)
    keys = [new_client().tier_key for _ in range(100)]
    keys += [keyschema.client_tag(f"ns-{i}/p", keyschema.short_digest(str(i))) for i in range(50)]
    keys += ["plain", "{}", "{}x", "x{}y", "{a}{b}", "a{b", "a}b{c}", "{{a}}", "{a", "}{a}",
             "é{ü}", "snow\u2603man", "sluice:b:{ns/p:203.0.113.7}:t:free", ""]
    keys += ["".join(rng.choice("ab{}:/é") for _ in range(rng.randrange(1, 12)))
             for _ in range(150)]
    node = redis_cluster.nodes[0]
    with node.client() as r:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", k)
        server_slots = pipe.execute()
    mismatches = [(k, s, key_slot(k)) for k, s in zip(keys, server_slots, strict=True)
                  if s != key_slot(k)]
    assert not mismatches

    # Many clients' buckets spread over every master, and every decision works.
    store = RedisStore(parse_redis_url(redis_cluster.url), timeout=1.0, connect_timeout=0.5)
    node_for = cluster_node_for(redis_cluster)
    lim = hourly(burst=2)
    try:
        clients = [new_client() for _ in range(90)]
        pairs = [[(c.tier_key, lim), (c.rule_key, lim)] for c in clients]
        replies = await asyncio.gather(*(decide(store, p, 1) for p in pairs))
        assert all(head(r) == (True, 0, 1) and r.buckets[1].remaining == 1 for r in replies)
        replies = await asyncio.gather(*(decide(store, p, 2) for p in pairs))
        assert all(not r.allowed for r in replies)  # one token left each: cost 2 refused everywhere
        ports = {node_for(c.tier_key).port for c in clients}
        assert ports == set(redis_cluster.ports)
        for c in clients:
            owner = node_for(c.tier_key)
            assert owner is node_for(c.rule_key)
            assert owner.execute("EXISTS", c.tier_key, c.rule_key) == 2
    finally:
        await store.close()


@pytest.mark.cluster
async def test_cluster_follows_moved_redirects(redis_cluster: RedisClusterProcs) -> None:
    """A stale slot map (every slot on one node) is corrected by MOVED replies."""
    store = RedisStore(parse_redis_url(redis_cluster.url), timeout=1.0, connect_timeout=0.5)
    lim = hourly(burst=3)
    try:
        await store.nodes.refresh_slots()
        wrong = redis_cluster.nodes[0].addr
        store.nodes._slots = [wrong] * 16384
        clients = [new_client() for _ in range(30)]
        for c in clients:
            assert head(await decide(store, [(c.tier_key, lim)], 1)) == (True, 0, 2)
        for c in clients:  # state landed on the real owner: the second call sees it
            assert head(await decide(store, [(c.tier_key, lim)], 1)) == (True, 0, 1)
    finally:
        await store.close()


@pytest.mark.cluster
async def test_cluster_recovers_when_a_slot_owner_address_dies(
        redis_cluster: RedisClusterProcs) -> None:
    """After a failover the old master's address is dead and no MOVED reply will ever come:
    connection errors must lead to a fresh slot map, or the store stays unavailable forever."""
    store = RedisStore(parse_redis_url(redis_cluster.url), timeout=0.2, connect_timeout=0.2)
    lim = hourly(burst=3)
    try:
        await store.nodes.refresh_slots()
        dead = ("127.0.0.1", pick_port())  # nothing listens there
        store.nodes._slots = [dead] * 16384
        c = new_client()
        deadline = time.monotonic() + 5.0
        failures = 0
        while True:
            try:
                reply = await decide(store, [(c.tier_key, lim)], 1)
                break
            except StoreUnavailable:
                failures += 1
                assert time.monotonic() < deadline, "slot map never refreshed"
                await asyncio.sleep(0.01)
        assert head(reply) == (True, 0, 2)
        assert failures >= 1
    finally:
        await store.close()


async def test_memory_per_idle_bucket(redis_server: RedisServer) -> None:
    store = RedisStore(parse_redis_url(redis_server.url), timeout=1.0, connect_timeout=0.5)
    lim = hourly(burst=10)
    n = 2000
    policy = f"mem-{uuid.uuid4().hex[:8]}/policy"
    keys = [new_client(policy).tier_key for _ in range(n)]
    try:
        with redis_server.client() as r:
            before = int(r.info("memory")["used_memory"])
            await asyncio.gather(*(decide(store, [(k, lim)], 1) for k in keys))
            after = int(r.info("memory")["used_memory"])
            pipe = r.pipeline(transaction=False)
            for k in keys[:200]:
                pipe.memory_usage(k, samples=0)
            usage = pipe.execute()
            assert r.exists(*keys[:500]) == 500
            r.delete(*keys)
    finally:
        await store.close()
    per_key = sum(usage) / len(usage)
    print(f"\nMEMORY USAGE per idle bucket: {per_key:.0f} bytes "
          f"(key of {len(keys[0])} chars); used_memory delta {(after - before) / n:.0f} B/bucket")
    assert 0 < per_key < 1024, per_key


async def test_redis_killed_then_restarted(fresh_redis: RedisServer) -> None:
    store = RedisStore(parse_redis_url(fresh_redis.url), timeout=0.5, connect_timeout=0.5)
    lim = hourly(burst=3)
    key = new_client().tier_key
    try:
        assert (await decide(store, [(key, lim)], 1)).allowed
        fresh_redis.kill()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await decide(store, [(key, lim)], 1)
        assert time.monotonic() - t0 < 2.0
        fresh_redis.restart()
        # A restarted Redis has no data and no scripts: the bucket starts full, NOSCRIPT reloads.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                reply = await decide(store, [(key, lim)], 1)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "store never recovered"
                await asyncio.sleep(0.01)
        assert head(reply) == (True, 0, 2)
    finally:
        await store.close()


async def test_paused_redis_times_out_then_recovers(fresh_redis: RedisServer) -> None:
    store = RedisStore(parse_redis_url(fresh_redis.url), timeout=0.05, connect_timeout=0.5)
    lim = hourly(burst=5)
    key = new_client().tier_key
    try:
        assert head(await decide(store, [(key, lim)], 1)) == (True, 0, 4)
        fresh_redis.pause()
        try:
            t0 = time.monotonic()
            results = await asyncio.gather(*(decide(store, [(key, lim)], 1) for _ in range(20)),
                                           return_exceptions=True)
            assert time.monotonic() - t0 < 0.5
            assert all(isinstance(r, StoreUnavailable) for r in results), results
        finally:
            fresh_redis.resume()
        deadline = time.monotonic() + 5.0
        while True:  # the late replies of the timed-out calls are dropped, never misattributed
            try:
                reply = await decide(store, [(key, lim)], 0)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        # Timed-out calls may have run on the server: at most 20 more tokens were taken.
        assert reply.allowed and 0 <= reply.buckets[0].remaining <= 4
    finally:
        await store.close()


# Memory and Redis agree -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_memory_and_redis_make_the_same_decisions(redis_server: RedisServer,
                                                        seed: int) -> None:
    """Same calls, same answers, when refill during the test cannot matter (hourly limits)."""
    rng = random.Random(seed)
    mem = MemoryStore()
    red = RedisStore(parse_redis_url(redis_server.url), timeout=1.0, connect_timeout=0.5)
    clients = [new_client() for _ in range(4)]
    lims = {c.tier_key: hourly(burst=rng.randint(1, 8), requests=rng.randint(1, 3))
            for c in clients}
    lims |= {c.rule_key: hourly(burst=rng.randint(1, 5)) for c in clients}
    tolerance_us = 10 * 10**6
    try:
        for _ in range(300):
            c = rng.choice(clients)
            keys = rng.choice([[c.tier_key], [c.rule_key], [c.tier_key, c.rule_key]])
            buckets = [(k, lims[k]) for k in keys]
            cost = rng.choice([0, 1, 1, 1, 2, 3, 5])
            a = await decide(mem, buckets, cost)
            b = await decide(red, buckets, cost)
            assert a.allowed == b.allowed, (keys, cost, a, b)
            assert remaining(a) == remaining(b), (keys, cost, a, b)  # remaining: exact
            times = [(a.retry_us, b.retry_us)] + [
                (x, y) for ba, bb in zip(a.buckets, b.buckets, strict=True)
                for x, y in ((ba.next_us, bb.next_us), (ba.full_us, bb.full_us))]
            for x, y in times:
                assert abs(x - y) <= tolerance_us, (a, b)
    finally:
        await red.close()
