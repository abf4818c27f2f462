"""The decision script's "resolve" decision (``scripts/decide.lua``), through the sidecar's Redis
store on a single Redis and a 3-master Cluster: it reads the key's grant and decides the bucket it
names (the tier's, or the key's own limit with EM = ceil(period / requests), CAP = burst x EM,
exact), with the request's rule buckets; an unknown key (none, expired, a tier the policy lacks,
an unreadable value) writes nothing, or decides the fallback buckets it was given; resolve
decisions batch with ordinary ones in one script run, each seeing the tokens of the one before."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
from sluice_core import grants, keyschema
from sluice_core.model import KeyGrant, Limit
from sluice_core.redisurl import parse_redis_url
from sluice_sidecar.stores.base import ResolveAsk, tier_args
from sluice_sidecar.stores.redis import RedisStore
from sluice_sidecar.transport.resp import Encoded
from support.grant_store import now_ms
from support.redis_servers import RedisClusterProcs, RedisServer

FREE = Limit(3, 3_600_000_000, 3)
PRO = Limit(100, 3_600_000_000, 100)
RULE = Limit(2, 60_000_000, 2)
OWN = Limit(7, 1_000_000, 4)  # 1 s / 7 is not whole: EM rounds up to 142,858 µs


def tiers(policy_ref: str) -> Encoded:
    return tier_args(grants.policy_tag(policy_ref),
                     [(name, keyschema.tier_suffix(name, lim.emission_us, lim.capacity_us),
                       lim.emission_us, lim.capacity_us) for name, lim in (("free", FREE), ("pro", PRO))])


@pytest.fixture
async def store(server: RedisServer | RedisClusterProcs) -> AsyncIterator[RedisStore]:
    s = RedisStore(parse_redis_url(server.url), timeout=2.0, connect_timeout=2.0)
    yield s
    await s.close()


class Key:
    """One API key of a fresh policy: its grant key, client tag and bucket keys."""

    def __init__(self) -> None:
        self.ref = f"gs-{uuid.uuid4().hex[:8]}/api"
        self.pid = keyschema.policy_id(self.ref)
        self.client = keyschema.client_for_api_key(hashlib.sha256(uuid.uuid4().bytes).digest())
        self.tag = keyschema.client_tag_for(self.pid, self.client)
        self.grant = keyschema.grant_key(self.pid, self.client)
        self.rule = keyschema.rule_bucket_key(self.tag, "search", RULE.emission_us, RULE.capacity_us)

    def ask(self, cost: int = 1, *, rule: bool = False, fallback: tuple[str, ...] = ()) -> ResolveAsk:
        rk = (self.rule,) if rule else ()
        rp = (RULE.emission_us, RULE.capacity_us) if rule else ()
        fp = tuple(x for _ in fallback for x in (FREE.emission_us, FREE.capacity_us))
        return ResolveAsk(self.grant, cost, rk, rp, fallback, fp, tiers(self.ref))

    def value(self, tier: str, limit: Limit | None = None, expires_ms: int = 0) -> str:
        return grants.encode(grants.StoredGrant(KeyGrant(tier, limit), "k1", expires_ms), self.ref)

    def bucket(self, tier: str, lim: Limit) -> str:
        return keyschema.tier_bucket_key(self.tag, tier, lim.emission_us, lim.capacity_us)


async def write(store: RedisStore, key: str, value: str) -> None:
    conn = await store.nodes.for_key(key)
    await conn.call("SET", key, value)


async def get(store: RedisStore, key: str) -> bytes | None:
    conn = await store.nodes.for_key(key)
    value: bytes | None = await conn.call("GET", key)
    return value


async def test_known_key_takes_its_tier_and_rule(store: RedisStore) -> None:
    k = Key()
    v = k.value("pro")
    await write(store, k.grant, v)
    got = await store.resolve(k.ask(2, rule=True))
    assert got.grant == v
    assert got.reply is not None and got.reply.allowed
    assert list(got.reply.debts) == [2 * PRO.emission_us, 2 * RULE.emission_us]
    assert await get(store, k.bucket("pro", PRO)) is not None and await get(store, k.rule) is not None


async def test_own_limit_is_exact(store: RedisStore) -> None:
    k = Key()
    await write(store, k.grant, k.value("pro", OWN))
    em = -(-OWN.period_us // OWN.requests)
    assert em == OWN.emission_us == 142_858
    replies = [await store.resolve(k.ask()) for _ in range(5)]
    assert [r.reply.allowed for r in replies if r.reply] == [True] * 4 + [False]
    first = replies[0].reply
    assert first is not None and list(first.debts) == [em]
    own = k.bucket("pro", OWN)  # "<tag>:t:pro:<limit tag of its own EM/CAP>"
    assert await get(store, own) is not None and await get(store, k.bucket("pro", PRO)) is None


@pytest.mark.parametrize("case", ["missing", "expired", "gone tier", "damaged"])
async def test_unknown_key_writes_nothing(store: RedisStore, case: str) -> None:
    k = Key()
    if case == "expired":
        await write(store, k.grant, k.value("pro", expires_ms=now_ms() - 1))
    elif case == "gone tier":
        await write(store, k.grant, k.value("gold"))
    elif case == "damaged":
        await write(store, k.grant, "2|pro|||||0|k1")
    got = await store.resolve(k.ask(1, rule=True))
    assert got == (None, None)
    for tier, lim in (("free", FREE), ("pro", PRO), ("gold", PRO)):
        assert await get(store, k.bucket(tier, lim)) is None
    assert await get(store, k.rule) is None


async def test_grant_of_a_colliding_policy_is_an_unknown_key(store: RedisStore) -> None:
    """A grant at this policy's grant key (the same 36-bit policy id) written for another
    policy ref: its value carries that ref's tag, not this one's."""
    k = Key()
    other = grants.encode(grants.StoredGrant(KeyGrant("pro"), "k1"), k.ref + "-grinder")
    await write(store, k.grant, other)
    assert await store.resolve(k.ask(1, rule=True)) == (None, None)
    assert await get(store, k.bucket("pro", PRO)) is None and await get(store, k.rule) is None
    with pytest.raises(ValueError, match="another policy"):
        grants.decode(other, k.ref)


@pytest.mark.parametrize("number", ["0x10", "1e3", " 5", "5 ", "1_000", "+5", "-5", "5.0", "1" * 16, ""])
@pytest.mark.parametrize("field", [2, 3, 4, 6])  # requests, period, burst, expiry
async def test_a_number_either_side_would_misread_is_refused_by_both(
        store: RedisStore, field: int, number: str) -> None:
    """One rule for a grant's numbers in the script and in grants.decode: a value one would take
    and the other not would charge a key twice (the script decides it as known, the sidecar then
    as unknown) or take a bucket the sidecar does not know."""
    k = Key()
    parts = k.value("pro", OWN, expires_ms=now_ms() + 3_600_000).split("|")
    parts[field] = number
    bad = "|".join(parts)
    assert await store.resolve(k.ask(1, rule=True)) == (None, None)  # missing: the baseline
    await write(store, k.grant, bad)
    assert await store.resolve(k.ask(1, rule=True)) == (None, None)
    assert await get(store, k.rule) is None
    with pytest.raises(ValueError, match="grant value"):
        grants.decode(bad, k.ref)


async def test_unknown_key_decides_its_fallback_in_the_same_call(store: RedisStore) -> None:
    k = Key()
    anon = keyschema.tier_bucket_key(k.tag.replace(k.client, "i203.0.113.9"), "free",
                                     FREE.emission_us, FREE.capacity_us)
    if not store.atomic((k.grant, anon)):
        anon = k.bucket("free", FREE) + ":fallback"  # same slot: stands in for one on the node
    got = [await store.resolve(k.ask(fallback=(anon,))) for _ in range(4)]
    assert [g.grant for g in got] == [None] * 4
    assert [g.reply.allowed for g in got if g.reply] == [True, True, True, False]
    assert await get(store, k.bucket("free", FREE)) is None


async def test_resolves_batch_with_ordinary_decisions(store: RedisStore) -> None:
    k = Key()
    await write(store, k.grant, k.value("free"))
    bucket = k.bucket("free", FREE)
    params = (FREE.emission_us, FREE.capacity_us)
    batches = store.batches
    # One loop turn: ordinary, resolve, ordinary, resolve on the same bucket: one script run.
    out = await asyncio.gather(store.decide((bucket,), 1, params), store.resolve(k.ask()),
                               store.decide((bucket,), 1, params), store.resolve(k.ask()))
    assert store.batches - batches == 1
    assert out[0].allowed and out[2].allowed  # type: ignore[union-attr]
    assert out[1].reply.allowed and not out[3].reply.allowed  # type: ignore[union-attr]
    assert list(out[3].reply.debts) == [3 * FREE.emission_us]  # type: ignore[union-attr]
