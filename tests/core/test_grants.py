"""API-key grants as stored in Redis (``sluice_core.grants``, ``configstore.put_grant``): the
encoding round-trips, refuses what it cannot store, and a write or revocation is one key in the
client's hash tag plus one change notice naming it. Real redis-server, single and Cluster."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
import redis.asyncio
from sluice_core import configstore, grants, keyschema
from sluice_core.model import KeyGrant, Limit
from support.redis_servers import RedisServer

OWN = grants.StoredGrant(KeyGrant("pro", Limit(10, 60_000_000, 5)), "shop/key-a", 1_900_000_000_000)
TIER = grants.StoredGrant(KeyGrant("free"), "keys.yaml#3")
REF = "shop/api"


@pytest.mark.parametrize("stored", [OWN, TIER])
def test_encoding_round_trips(stored: grants.StoredGrant) -> None:
    assert grants.decode(grants.encode(stored, REF), REF) == stored
    assert grants.decode(grants.encode(stored, REF).encode()) == stored


def test_own_limit_carries_its_bucket_tag() -> None:
    lim = OWN.grant.limit
    assert lim is not None
    assert grants.encode(OWN, REF).split("|")[5] == keyschema.limit_tag(lim.emission_us, lim.capacity_us)


@pytest.mark.parametrize("key_id", ["", "has space", "new\nline", "x" * (grants.MAX_KEY_ID + 1)])
def test_unstorable_key_id_is_refused(key_id: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        grants.encode(grants.StoredGrant(KeyGrant("free"), key_id), REF)


@pytest.mark.parametrize("value", ["", "1|pro|||||0|x", "2|pro|||", "2||||||0|t|x", "2|pro|a|b|c|t|0|t|x"])
def test_damaged_value_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="grant value"):
        grants.decode(value)


@pytest.mark.parametrize("topology", ["redis_server", "redis_cluster"])
async def test_put_and_revoke_write_one_key_and_announce_it(topology: str, request: pytest.FixtureRequest) -> None:
    server: RedisServer = request.getfixturevalue(topology)
    policy_ref = f"shop-{uuid.uuid4().hex[:8]}/api"
    raw = hashlib.sha256(uuid.uuid4().bytes).digest()
    pid, client_id = keyschema.policy_id(policy_ref), keyschema.client_for_api_key(raw)
    key = keyschema.grant_key(pid, client_id)
    # The grant shares the hash tag of the client's buckets: one slot, one script call.
    assert key.startswith(keyschema.client_tag(policy_ref, client_id) + ":")
    async with configstore.connect(server.url) as client:
        await client.redis.initialize()  # a Cluster client picks a pub/sub node from its slot map
        sub = client.redis.pubsub()
        await sub.subscribe(keyschema.KEYS_CHANNEL)
        try:
            await configstore.put_grant(client, policy_ref, raw, OWN)
            assert await configstore.get_grant(client, policy_ref, raw) == OWN
            assert abs(await client.redis.pexpiretime(key) - OWN.expires_ms) <= 1
            await configstore.revoke_grant(client, policy_ref, raw)
            assert await configstore.get_grant(client, policy_ref, raw) is None
            notices = await _messages(sub, 2)
        finally:
            await sub.aclose()
    assert notices == [keyschema.keys_notice(pid, client_id)] * 2


async def _messages(sub: redis.asyncio.client.PubSub, n: int) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            m = await sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if m is not None:
                out.append(m["data"].decode())
    return out
