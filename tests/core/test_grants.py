"""API-key grants as stored in Redis (``sluice_core.grants``, ``configstore.put_grant``): the
encoding round-trips, refuses what it cannot store, and a write or revocation is one key in the
client's hash tag plus one change notice naming it. Real redis-server, single and Cluster."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sluice_core import configstore, grants, keyschema
from sluice_core.model import KeyGrant, Limit
from support.key_notices import KeyNotices
from support.redis_servers import RedisClusterProcs, RedisServer

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
    server: RedisServer | RedisClusterProcs = request.getfixturevalue(topology)
    policy_ref = f"shop-{uuid.uuid4().hex[:8]}/api"
    raw = hashlib.sha256(uuid.uuid4().bytes).digest()
    pid, client_id = keyschema.policy_id(policy_ref), keyschema.client_for_api_key(raw)
    key = keyschema.grant_key(pid, client_id)
    # The grant shares the hash tag of the client's buckets: one slot, one script call.
    assert key.startswith(keyschema.client_tag(policy_ref, client_id) + ":")
    nodes = server.nodes if isinstance(server, RedisClusterProcs) else [server]
    with KeyNotices(nodes) as listen:
        async with configstore.connect(server.url) as client:
            await configstore.put_grant(client, policy_ref, raw, OWN)
            assert await configstore.get_grant(client, policy_ref, raw) == OWN
            assert await client.redis.pexpiretime(key) == -1  # no TTL: the value carries the expiry
            await configstore.revoke_grant(client, policy_ref, raw)
            assert await configstore.get_grant(client, policy_ref, raw) is None
        notices = listen.until_marker(key)
    assert notices == [keyschema.keys_notice(pid, client_id)] * 2
