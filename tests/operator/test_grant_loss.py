"""Redis losing the operator's key grants, with real Redis and the resync's sweep (no kopf: the
hooks do what handlers.py's do): a revocation rolled back by an older snapshot, a policy's key
index gone (what a Cluster node restarted empty does to the policies in its slots), a late write
of a replica that was the leader, and a Redis that does not answer the check (no loss: nothing
rewritten)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.crc import key_slot
from sluice_core import configstore, keyschema
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.keygrants import policy_ref
from sluice_operator.keysecrets import POLICY_LABEL, SecretKey, read_secret
from sluice_operator.reconcile import Reconciler
from sluice_operator.resync import Hooks, Resync, Standalone
from support.polling import wait_for
from support.redis_servers import RedisClusterProcs, RedisServer


def policy_body(ns: str) -> dict[str, Any]:
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "api", "namespace": ns, "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
                     "apiKeys": {"header": "X-API-Key", "required": True},
                     "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}


def secret(ns: str, name: str, api_key: str) -> SecretKey:
    body = {"metadata": {"name": name, "namespace": ns, "labels": {POLICY_LABEL: "api"}},
            "data": {"key": base64.b64encode(api_key.encode()).decode(), "tier": base64.b64encode(b"free").decode()}}
    record = read_secret(body, POLICY_LABEL)
    assert record is not None and record.digest is not None
    return record


@dataclass
class Operator:
    """One replica: its Reconciler, the Secrets it knows, and its resync."""

    reconciler: Reconciler
    ns: str
    keys: list[SecretKey] = field(default_factory=list)
    restores: int = 0

    @property
    def ref(self) -> str:
        return policy_ref(self.ns, "api")

    async def reconcile(self, scope: str = "") -> None:
        out = await self.reconciler.reconcile(scope or self.ns, [policy_body(self.ns)], list(self.keys))
        assert out.redis_error is None, out.redis_error

    async def restore(self) -> None:
        self.restores += 1
        self.reconciler.keys.forget_synced()
        await self.reconcile()

    def resync(self) -> Resync:
        served: Mapping[str, Sequence[Mapping[str, Any]]] = {self.ns: [policy_body(self.ns)]}
        hooks = Hooks(served=lambda: served, restore=self.restore, reconcile=self.reconcile,
                      write_status=_no_status)
        r = self.reconciler
        return Resync(30.0, r, HeartbeatView(r.redis, 60.0), Standalone(), hooks)

    async def granted(self, key: SecretKey) -> bool:
        assert key.digest is not None
        return await configstore.get_grant(self.reconciler.redis, self.ref, key.digest) is not None


async def _no_status(_scope: str, _name: str, _status: dict[str, Any]) -> None:
    return None


@pytest.fixture
async def operator(redis_server: RedisServer) -> AsyncIterator[Operator]:
    async with _operator(redis_server.url, f"loss-{uuid.uuid4().hex[:8]}", f"test-{uuid.uuid4().hex[:8]}") as op:
        yield op


class _operator:
    def __init__(self, url: str, ns: str, scope: str, *, timeout: float = 5.0) -> None:
        self.op = Operator(Reconciler(configstore.connect(url, timeout=timeout), scope=scope), ns)

    async def __aenter__(self) -> Operator:
        assert await self.op.reconciler.start_counting()
        return self.op

    async def __aexit__(self, *_: object) -> None:
        await self.op.reconciler.close()


async def test_a_revocation_rolled_back_by_an_older_snapshot_is_undone(fresh_redis: RedisServer) -> None:
    """An older snapshot (a failover to a lagging replica, an RDB restore) brings back the grant
    of a key revoked since, and the count of writes as it was then: the revocation was counted,
    so the sweep notices and judges the keys again."""
    async with _operator(fresh_redis.url, "snap", "test") as op:
        kept, revoked = secret("snap", "k0", "sk-kept"), secret("snap", "k1", "sk-revoked")
        op.keys = [kept, revoked]
        await op.reconcile()
        assert await op.granted(revoked)
        fresh_redis.execute("SAVE")
        shutil.copy(fresh_redis.dir / "dump.rdb", fresh_redis.dir / "older.rdb")
        op.keys = [kept]
        await op.reconciler.key_changed("snap", revoked.key_id, None)  # the Secret deleted
        assert not await op.granted(revoked)
        await op.resync().sweep()
        assert op.restores == 0  # nothing lost yet
        fresh_redis.kill()  # the older snapshot restored (no save points: nothing newer is written)
        shutil.copy(fresh_redis.dir / "older.rdb", fresh_redis.dir / "dump.rdb")
        fresh_redis.restart()
        assert await op.granted(revoked)
        await op.resync().sweep()
        assert op.restores == 1
        assert not await op.granted(revoked) and await op.granted(kept)
        assert await op.reconciler.intact()


async def test_a_policy_whose_key_index_is_gone_gets_its_keys_written_again(operator: Operator) -> None:
    """What a Cluster node restarted empty does to the policies in its slots: their index and
    grants gone, the count of writes and the documents (on other nodes) intact. Only that
    scope is judged again, not every policy."""
    op = operator
    op.keys = [secret(op.ns, f"k{i}", f"sk-{op.ns}-{i}") for i in range(3)]
    await op.reconcile()
    pid = keyschema.policy_id(op.ref)
    r = op.reconciler.redis.redis
    await r.delete(keyschema.grant_index_key(pid), *(
        keyschema.grant_key(pid, keyschema.client_for_api_key(k.digest or b"")) for k in op.keys))
    assert await op.reconciler.intact()  # the count cannot tell
    await op.resync().sweep()
    assert op.restores == 0
    for key in op.keys:
        assert await op.granted(key)
    assert await r.scard(keyschema.grant_index_key(pid)) == len(op.keys)


async def test_a_late_grant_write_of_the_replica_that_led_before_is_undone(redis_server: RedisServer) -> None:
    """A leader change: the old leader's gate says "active" for a few seconds more, and it
    writes a grant for an event older than the new leader's judgement (the Secret is gone
    since). The write is counted in the count both replicas share: the new leader's next sweep
    judges the keys again and revokes it."""
    ns, scope = f"late-{uuid.uuid4().hex[:8]}", f"test-{uuid.uuid4().hex[:8]}"
    async with _operator(redis_server.url, ns, scope) as old:
        await old.reconcile()  # the old leader judged the policy: no keys yet
        async with _operator(redis_server.url, ns, scope) as new:
            await new.reconcile()  # the new leader's first judgement: no keys (the Secret is gone)
            stale = secret(ns, "k0", f"sk-{ns}")
            await old.reconciler.key_changed(ns, stale.key_id, stale)  # the old leader's late write
            assert await new.granted(stale)
            await new.resync().sweep()
            assert new.restores == 1
            assert not await new.granted(stale)


async def test_a_redis_that_does_not_answer_the_check_costs_no_rewrite(fresh_redis: RedisServer) -> None:
    """One check that gets no answer is no loss: the next one that does looks again, and finds
    everything there (before, it rewrote every grant of every policy)."""
    async with _operator(fresh_redis.url, "blip", "test", timeout=0.3) as op:
        op.keys = [secret("blip", "k0", "sk-blip")]
        await op.reconcile()
        fresh_redis.pause()
        try:
            await op.resync().sweep()
        finally:
            fresh_redis.resume()
        await op.resync().sweep()
        assert op.restores == 0
        assert await op.reconciler.intact()
        assert op.reconciler.keys.judged("blip", "api")


async def test_a_replica_that_starts_does_not_make_the_active_one_rewrite_everything(
        redis_server: RedisServer) -> None:
    """A rolling update starts a new replica (passive) beside the active one: taking the count
    reads it, so the active one's next check finds the count it wrote."""
    ns, scope = f"start-{uuid.uuid4().hex[:8]}", f"test-{uuid.uuid4().hex[:8]}"
    async with _operator(redis_server.url, ns, scope) as active:
        active.keys = [secret(ns, "k0", f"sk-{ns}")]
        await active.reconcile()
        async with _operator(redis_server.url, ns, scope):
            await active.resync().sweep()
        assert active.restores == 0


async def test_a_flushed_redis_gets_its_grants_back_before_the_next_sweep(fresh_redis: RedisServer) -> None:
    """FLUSHALL (or a restart without persistence): required keys are refused until their grants
    are back, so the resync looks for the loss between sweeps (here an interval of 5 minutes;
    it checks every REDIS_CHECK_S)."""
    async with _operator(fresh_redis.url, "flush", "test") as op:
        key = secret("flush", "k0", "sk-flush")
        op.keys = [key]
        await op.reconcile()
        r = op.reconciler
        served: Mapping[str, Sequence[Mapping[str, Any]]] = {op.ns: [policy_body(op.ns)]}
        resync = Resync(300.0, r, HeartbeatView(r.redis, 60.0), Standalone(),
                        Hooks(served=lambda: served, restore=op.restore, reconcile=op.reconcile,
                              write_status=_no_status))
        task = asyncio.create_task(resync.run())
        try:
            fresh_redis.execute("FLUSHALL")
            await wait_for(lambda: op.granted(key), timeout=15.0, what="the grant written again")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert op.restores == 1


@pytest.mark.cluster
async def test_a_cluster_node_restarted_empty_gets_its_policys_keys_back() -> None:
    """A 3-master Cluster of this test's own: the node that holds the policy's key index (and
    neither the count of writes nor the namespace's document) restarts empty, with its slots.
    The count and the document cannot tell; the index's absence does."""
    with RedisClusterProcs(3) as cluster:
        owners = cluster.slot_owners()

        def node_of(key: str) -> int:
            return owners[key_slot(key.encode())]

        ns = next(ns for ns in (f"node-{i}" for i in range(1000))
                  if node_of(keyschema.grant_index_key(keyschema.policy_id(policy_ref(ns, "api"))))
                  not in {node_of(keyschema.OPERATOR_EPOCH_KEY), node_of(keyschema.config_key(ns))})
        async with _operator(cluster.url, ns, "test") as op:
            op.keys = [secret(ns, f"k{i}", f"sk-{ns}-{i}") for i in range(5)]
            await op.reconcile()
            pid = keyschema.policy_id(op.ref)
            node = cluster.node_by_port(node_of(keyschema.grant_index_key(pid)))
            node.restart()  # empty (no persistence), its slots kept (nodes.conf)
            cluster.wait_ok()
            resync = op.resync()

            async def all_back() -> bool:
                await resync.sweep()  # the first command after the restart may fail: then the next
                return all([await op.granted(k) for k in op.keys])

            await wait_for(all_back, timeout=20.0, what="the lost node's grants written again")
            assert op.restores == 0  # only the scope judged again, not everything
