"""What keeps the grants of a policy whole when things go wrong (``sluice_core.grantstore``,
``keysapply``): grants are never evictable; a bulk write or revocation that fails part-way still
tells the sidecars, and so does its retry; a run of ``sluice apply`` that loses its staging set
stops before it revokes anything more; one run of a policy's keys at a time, and a key written
alone during a run is kept. Real redis-server."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from sluice_core import configstore, grants, grantstore, keysapply, keyschema
from sluice_core.model import KeyGrant
from sluice_core.parse import parse_policy
from support.key_notices import KeyNotices
from support.keys_files import POLICY, write_keys_file
from support.redis_servers import RedisClusterProcs, RedisServer


def digest(i: int, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}-{i}".encode()).digest()


def writes(salt: str, ids: range, policy_ref: str, expires_ms: int = 0) -> Iterator[grantstore.GrantWrite]:
    for i in ids:
        s = grants.StoredGrant(KeyGrant("pro"), f"key-{i}", expires_ms)
        yield grantstore.GrantWrite(keyschema.client_for_api_key(digest(i, salt)), grants.encode(s, policy_ref), expires_ms)


async def test_no_grant_is_evicted_under_volatile_ttl_and_bucket_churn() -> None:
    """The eviction policy the README calls safe (volatile-ttl) with memory full of buckets that
    come and go: it evicts buckets, never a grant, even one expiring before every bucket."""
    with RedisServer(extra_args=["--maxmemory", "8mb", "--maxmemory-policy", "volatile-ttl"]) as server:
        policy_ref, salt = "churn/api", uuid.uuid4().hex
        pid = keyschema.policy_id(policy_ref)
        soon = int(time.time() * 1000) + 3_600_000  # an hour: sooner than any bucket's day
        async with configstore.connect(server.url) as client:
            await grantstore.write(client, policy_ref, writes(salt, range(5_000), policy_ref, soon))
            await configstore.put_grant(client, policy_ref, digest(9_999, salt),
                                        grants.StoredGrant(KeyGrant("pro"), "alone", soon))
        r = server.client()
        filler, deadline, i = b"x" * 1_000, time.monotonic() + 60, 0
        while int(r.info("stats")["evicted_keys"]) < 20_000 and time.monotonic() < deadline:
            pipe = r.pipeline(transaction=False)
            for _ in range(500):
                pipe.set(f"sl:{{{pid}:i10.0.{i}}}:b", filler, px=86_400_000)
                i += 1
            pipe.execute()
        assert int(r.info("stats")["evicted_keys"]) >= 20_000, "the churn did not fill memory"
        ids = [keyschema.client_for_api_key(digest(n, salt)) for n in [*range(5_000), 9_999]]
        pipe = r.pipeline(transaction=False)
        for cid in ids:
            pipe.exists(keyschema.grant_key(pid, cid))
        assert sum(pipe.execute()) == len(ids)
        assert r.scard(keyschema.grant_index_key(pid)) == len(ids)


class Run:
    """One policy's ``sluice apply`` steps, in process (keysapply), against one Redis."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ns, self.salt = f"gs-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
        self.policy = parse_policy(yaml.safe_load(POLICY.format(name="api", namespace=self.ns)))
        self.ref = self.policy.ref
        self.pid = keyschema.policy_id(self.ref)

    def file(self, name: str, indices: range) -> Path:
        return write_keys_file(self.tmp / name, self.salt, indices)

    async def apply(self, client: configstore.Client, path: Path) -> int:
        staged = await keysapply.stage(client, self.policy, path)
        try:
            await staged.write(client)
            return await staged.revoke_unlisted(client)
        finally:
            await staged.discard(client)


async def test_a_staging_set_lost_mid_apply_stops_the_revocations(redis_server: RedisServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging set disappears after the first index page (an eviction, a FLUSH, another
    tool): every later page would look unlisted. The run stops: no listed key is revoked."""
    run = Run(tmp_path)
    pages = grantstore.pages

    async def losing_after_first_page(client: configstore.Client, ref: str, *,
                                      batch: int = grantstore.BATCH) -> AsyncIterator[list[str]]:
        first = True
        async for page in pages(client, ref, batch=batch):
            if not first:
                # (by pattern: before the fix, a run named its set with a random run id)
                async for k in client.redis.scan_iter(match=f"{keyschema.grant_index_key(run.pid)}:apply*"):
                    await client.redis.delete(k)
            first = False
            yield page

    async with configstore.connect(redis_server.url) as client:
        assert await run.apply(client, run.file("a.yaml", range(3_000))) == 0
        monkeypatch.setattr(grantstore, "pages", losing_after_first_page)
        with pytest.raises(configstore.ConfigStoreError, match="lost the keys staged"):
            await run.apply(client, run.file("b.yaml", range(3_000)))  # revokes nothing, when whole
        assert await grantstore.count(client, run.ref) == 3_000
        # The run that stopped released its lease and dropped its sets: nothing left but the index.
        left = {k async for k in client.redis.scan_iter(match=f"{keyschema.grant_index_key(run.pid)}*")}
        assert left == {keyschema.grant_index_key(run.pid).encode()}
        for i in (0, 1_500, 2_999):
            assert await configstore.get_grant(client, run.ref, hashlib.sha256(
                f"sk-{run.salt}-{i:08d}".encode()).digest()) is not None


def _acl_writer(server: RedisServer) -> str:
    """A user of its own, whose rights a test takes away half-way; the URL to connect as it."""
    server.execute("ACL", "SETUSER", "writer", "on", ">pw", "~*", "&*", "+@all")
    return f"redis://writer:pw@{server.host}:{server.port}"


async def test_a_bulk_write_that_fails_half_way_still_announces(fresh_redis: RedisServer) -> None:
    """Writes refused from the second batch on (NOPERM): the first batch's keys were announced
    as it landed, then a best-effort "<policy id> *" for the batch whose fate is unknown."""
    url, policy_ref, salt = _acl_writer(fresh_redis), f"ns-{uuid.uuid4().hex[:8]}/api", uuid.uuid4().hex
    pid = keyschema.policy_id(policy_ref)

    def refusing_after(n: int) -> Iterator[grantstore.GrantWrite]:
        for i, w in enumerate(writes(salt, range(200), policy_ref)):
            if i == n:
                fresh_redis.execute("ACL", "SETUSER", "writer", "-set")
            yield w

    with KeyNotices([fresh_redis]) as notices:
        async with configstore.connect(url) as client:
            with pytest.raises(configstore.ConfigStoreError, match="cannot write"):
                await grantstore.write(client, policy_ref, refusing_after(60), batch=50)
        got = notices.until_marker(keyschema.grant_index_key(pid))
    first = [keyschema.keys_notice(pid, keyschema.client_for_api_key(digest(i, salt))) for i in range(50)]
    assert got == [*first, keyschema.keys_notice(pid)]


async def test_a_revoke_that_fails_half_way_announces_and_so_does_its_retry(fresh_redis: RedisServer) -> None:
    """The grants are deleted, then the index entries are refused: "<policy id> *" goes out. The
    retry finds no grant left but removes the index entries: it announces those keys (a sidecar
    may still cache them)."""
    url, policy_ref, salt = _acl_writer(fresh_redis), f"ns-{uuid.uuid4().hex[:8]}/api", uuid.uuid4().hex
    pid = keyschema.policy_id(policy_ref)
    ids = [keyschema.client_for_api_key(digest(i, salt)) for i in range(3)]
    async with configstore.connect(url) as client:
        await grantstore.write(client, policy_ref, writes(salt, range(3), policy_ref))
        with KeyNotices([fresh_redis]) as notices:
            fresh_redis.execute("ACL", "SETUSER", "writer", "-srem")
            with pytest.raises(configstore.ConfigStoreError, match="cannot revoke"):
                await grantstore.revoke(client, policy_ref, ids)
            assert notices.until_marker(keyschema.grant_index_key(pid)) == [keyschema.keys_notice(pid)]
            fresh_redis.execute("ACL", "SETUSER", "writer", "+srem")
            assert await grantstore.revoke(client, policy_ref, ids) == 3
            assert notices.until_marker(keyschema.grant_index_key(pid)) == [
                keyschema.keys_notice(pid, c) for c in ids]
        assert await grantstore.count(client, policy_ref) == 0


@pytest.mark.parametrize("topology", ["redis_server", pytest.param("redis_cluster", marks=pytest.mark.cluster)])
async def test_one_apply_of_a_policys_keys_at_a_time(topology: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """A second run of the same policy fails fast, naming the policy and when the lease ends; a
    key written alone during the first run is kept by it (on a Cluster, through the index's
    slot); a run killed half-way (its lease expired) blocks nothing and the next run sweeps what
    it left."""
    server: RedisServer | RedisClusterProcs = request.getfixturevalue(topology)
    run = Run(tmp_path)
    lone, lone_revoked = digest(1, "alone"), digest(2, "alone")
    async with configstore.connect(server.url) as client:
        await configstore.put_grant(client, run.ref, lone_revoked, grants.StoredGrant(KeyGrant("pro"), "b"))
        first = await keysapply.stage(client, run.policy, run.file("a.yaml", range(1_500)))
        try:
            with pytest.raises(keysapply.LeaseHeld, match=rf"policy '{run.ref}'.*lease expires in \d+\.\d s"):
                await keysapply.stage(client, run.policy, run.file("b.yaml", range(10)))
            await first.write(client)
            await configstore.put_grant(client, run.ref, lone, grants.StoredGrant(KeyGrant("pro"), "a"))
            await configstore.revoke_grant(client, run.ref, lone_revoked)
            assert await first.revoke_unlisted(client) == 0  # neither lone key is the run's to revoke
        finally:
            await first.discard(client)
        assert await configstore.get_grant(client, run.ref, lone) is not None
        assert await grantstore.count(client, run.ref) == 1_501

        killed = await keysapply.stage(client, run.policy, run.file("c.yaml", range(2_000)))
        killed.spool.close()  # never discarded: a process killed half-way; its lease runs out
        await client.redis.delete(keyschema.grant_lease_key(run.pid))
        assert await run.apply(client, run.file("d.yaml", range(1_000))) == 501  # the lone key too
        left = {k async for k in client.redis.scan_iter(match=f"{keyschema.grant_index_key(run.pid)}*")}
        assert left == {keyschema.grant_index_key(run.pid).encode()}
