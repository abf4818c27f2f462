"""Grant writes keep the policy's key index (``sluice_core.grantstore``, ``configstore.put_grant``):
bulk writes and revocations in pipelined batches, one "<policy id> *" notice per bulk change,
one key's change still O(1) writes and one notice. Real redis-server: single, 3-master Cluster
and Sentinel."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sluice_core import configstore, grants, grantstore, keyschema
from sluice_core.model import KeyGrant, Limit
from support.key_notices import KeyNotices
from support.redis_servers import RedisClusterProcs, RedisServer, sentinel_for

TOPOLOGIES = ["single", pytest.param("cluster", marks=pytest.mark.cluster), "sentinel"]


@dataclass
class Target:
    url: str
    nodes: list[RedisServer]  # every primary, for direct reads and command counts


@pytest.fixture(scope="module")
def sentinel_target() -> Iterator[Target]:
    with RedisServer() as master, sentinel_for(master) as port:
        yield Target(f"redis+sentinel://127.0.0.1:{port}/sluicemaster", [master])


@pytest.fixture(params=TOPOLOGIES)
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Target(server.url, [server])
    if request.param == "cluster":
        cluster: RedisClusterProcs = request.getfixturevalue("redis_cluster")
        return Target(cluster.url, cluster.nodes)
    sentinel_target: Target = request.getfixturevalue("sentinel_target")
    return Target(sentinel_target.url, sentinel_target.nodes)


def digest(i: int, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}-{i}".encode()).digest()


def stored(i: int) -> grants.StoredGrant:
    """Every third key its own limit, every fifth an expiry."""
    limit = Limit(10 + i % 7, 60_000_000, 5) if i % 3 == 0 else None
    expires = 4_000_000_000_000 + i if i % 5 == 0 else 0
    return grants.StoredGrant(KeyGrant("pro" if i % 2 else "free", limit), f"key-{i}", expires)


def grant_writes(salt: str, ids: range, policy_ref: str) -> Iterator[grantstore.GrantWrite]:
    for i in ids:
        s = stored(i)
        yield grantstore.GrantWrite(keyschema.client_for_api_key(digest(i, salt)), grants.encode(s, policy_ref), s.expires_ms)


async def index_members(client: configstore.Client, policy_ref: str) -> set[str]:
    return {cid async for page in grantstore.pages(client, policy_ref, batch=300) for cid in page}


async def test_bulk_write_and_revoke_keep_the_index(target: Target) -> None:
    policy_ref, salt = f"ns-{uuid.uuid4().hex[:8]}/api", uuid.uuid4().hex
    n = 2_500  # three batches of 1,000: the last one partial
    async with configstore.connect(target.url) as client:
        assert await grantstore.write(client, policy_ref, grant_writes(salt, range(n), policy_ref)) == n
        assert await grantstore.count(client, policy_ref) == n
        ids = [keyschema.client_for_api_key(digest(i, salt)) for i in range(n)]
        assert await index_members(client, policy_ref) == set(ids)
        for i in (0, 1, 3, 5, 999, 1000, 2499):
            assert await configstore.get_grant(client, policy_ref, digest(i, salt)) == stored(i)
        pid = keyschema.policy_id(policy_ref)
        # No TTL, even with an expiry: the value carries it (an eviction policy must not take it).
        assert await client.redis.pexpiretime(keyschema.grant_key(pid, ids[5])) == -1
        assert await client.redis.pexpiretime(keyschema.grant_key(pid, ids[1])) == -1

        gone = ids[500:1700]  # across batch boundaries
        assert await grantstore.revoke(client, policy_ref, gone, batch=400) == len(gone)
        assert await grantstore.count(client, policy_ref) == n - len(gone)
        assert await index_members(client, policy_ref) == set(ids[:500] + ids[1700:])
        for i in (499, 500, 1699):
            assert (await configstore.get_grant(client, policy_ref, digest(i, salt)) is None) == (500 <= i < 1700)
        assert await grantstore.revoke(client, policy_ref, ids) == n  # the rest; absent ones are no error
        assert await grantstore.count(client, policy_ref) == 0


async def test_put_and_revoke_keep_the_index(target: Target) -> None:
    policy_ref, raw = f"ns-{uuid.uuid4().hex[:8]}/api", hashlib.sha256(uuid.uuid4().bytes).digest()
    cid = keyschema.client_for_api_key(raw)
    async with configstore.connect(target.url) as client:
        await configstore.put_grant(client, policy_ref, raw, stored(1))
        assert await index_members(client, policy_ref) == {cid}
        await configstore.put_grant(client, policy_ref, raw, stored(2))  # a change: still one entry
        assert await grantstore.count(client, policy_ref) == 1
        await configstore.revoke_grant(client, policy_ref, raw)
        assert await grantstore.count(client, policy_ref) == 0
        assert await configstore.get_grant(client, policy_ref, raw) is None


async def test_a_bulk_change_announces_the_changed_keys_or_the_whole_policy(target: Target) -> None:
    """Each batch as it lands: many keys changed, one "<policy id> *". A re-write that changes a
    few: one notice each (sidecars keep what they cached of the others). Nothing changed: no
    notice."""
    policy_ref, salt = f"ns-{uuid.uuid4().hex[:8]}/api", uuid.uuid4().hex
    pid = keyschema.policy_id(policy_ref)
    ids = [keyschema.client_for_api_key(digest(i, salt)) for i in range(1_500)]
    with KeyNotices(target.nodes) as listen:
        async with configstore.connect(target.url) as client:
            changes = grantstore.Changes()
            await grantstore.write(client, policy_ref, grant_writes(salt, range(1_500), policy_ref), changes, batch=1_000)
            assert changes.count == 1_500
            assert listen.until_marker(keyschema.grant_index_key(pid)) == [keyschema.keys_notice(pid)] * 2

            again = grantstore.Changes()
            moved = grantstore.GrantWrite(ids[1_200], grants.encode(stored(1_201), policy_ref), stored(1_201).expires_ms)
            writes = [moved if w.client_id == ids[1_200] else w for w in grant_writes(salt, range(1_500), policy_ref)]
            await grantstore.write(client, policy_ref, writes, again)
            await grantstore.revoke(client, policy_ref, [ids[3], ids[4], "k-not-granted"], again)
            assert again.count == 3
            assert listen.until_marker(keyschema.grant_index_key(pid)) == [
                keyschema.keys_notice(pid, c) for c in (ids[1_200], ids[3], ids[4])]

            assert await grantstore.announce(client, policy_ref, grantstore.Changes()) == 0
            assert listen.until_marker(keyschema.grant_index_key(pid)) == []


WRITES = ("set", "del", "sadd", "srem")


@pytest.mark.parametrize("topology", ["fresh_redis", pytest.param("redis_cluster", marks=pytest.mark.cluster)])
async def test_one_key_change_is_one_write_and_one_notice(topology: str, request: pytest.FixtureRequest) -> None:
    """Whatever the number of keys (1,000 here): the grant, its index entry, one notice."""
    server = request.getfixturevalue(topology)
    nodes = server.nodes if isinstance(server, RedisClusterProcs) else [server]
    policy_ref, salt = f"ns-{uuid.uuid4().hex[:8]}/api", uuid.uuid4().hex
    async with configstore.connect(server.url) as client:
        await grantstore.write(client, policy_ref, grant_writes(salt, range(1_000), policy_ref))
        with KeyNotices(nodes) as listen:
            for action in ("put", "revoke"):
                for node in nodes:
                    node.client().config_resetstat()
                if action == "put":
                    await configstore.put_grant(client, policy_ref, digest(7, salt), stored(8))
                else:
                    await configstore.revoke_grant(client, policy_ref, digest(7, salt))
                calls = _calls(nodes)
                assert {c: calls.get(c, 0) for c in WRITES} == (
                    {"set": 1, "del": 0, "sadd": 1, "srem": 0} if action == "put"
                    else {"set": 0, "del": 1, "sadd": 0, "srem": 1})
                assert calls["publish"] == 1
                pid, cid = keyschema.policy_id(policy_ref), keyschema.client_for_api_key(digest(7, salt))
                notices = listen.until_marker(keyschema.grant_key(pid, cid))
                assert notices == [keyschema.keys_notice(pid, cid)]


def _calls(nodes: list[RedisServer]) -> dict[str, int]:
    """Commands executed (inside scripts too) since CONFIG RESETSTAT, summed over the nodes;
    the nodes' own INFO/CONFIG calls of this function are not counted."""
    out: dict[str, int] = {}
    for node in nodes:
        for name, stat in node.client().info("commandstats").items():
            cmd = name.removeprefix("cmdstat_")
            out[cmd] = out.get(cmd, 0) + int(stat["calls"])
    return out
