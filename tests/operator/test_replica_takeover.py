"""A replica that has just become active reconciles from kopf's indexes, which kopf fills only
once it has resumed: until then a scope's policies are missing from them. Such a reconcile (a
key event seen while passive, a resync) must neither empty the scope's document nor revoke its
policies' grants; a policy leaves only when it is marked deleted, or when the index is known to
be complete (kopf's handlers). Real Redis; the Reconciler without kopf (what handlers call)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sluice_core import configstore, grantstore
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.keysecrets import POLICY_LABEL, SecretKey, read_secret
from sluice_operator.reconcile import Reconciler
from sluice_operator.resync import Hooks, Resync, Standalone
from support.redis_servers import RedisServer

KEYS = 5


def policy(ns: str, *, deleted: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": ns, "generation": 1}
    if deleted:
        meta["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy", "metadata": meta,
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
                     "apiKeys": {"header": "X-API-Key", "required": True},
                     "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}


def records(ns: str) -> list[SecretKey]:
    out = []
    for i in range(KEYS):
        body = {"metadata": {"name": f"k{i}", "namespace": ns, "labels": {POLICY_LABEL: "p"}},
                "data": {"key": base64.b64encode(f"key-{ns}-{i}".encode()).decode(),
                         "tier": base64.b64encode(b"free").decode()}}
        record = read_secret(body, POLICY_LABEL)
        assert record is not None
        out.append(record)
    return out


async def served_state(client: configstore.Client, ns: str) -> tuple[list[str], int]:
    cfg = await configstore.read(client, ns)
    return [p.name for p in cfg.policies], await grantstore.count(client, f"{ns}/p")


async def first_replica(url: str, ns: str) -> None:
    a = Reconciler(configstore.connect(url))
    try:
        out = await a.reconcile(ns, [policy(ns)], records(ns), complete=True)
        assert out.programmed and out.pushed, out
        assert await served_state(a.redis, ns) == (["p"], KEYS)
    finally:
        await a.close()


async def test_a_takeover_before_kopf_filled_its_index_keeps_the_document_and_grants(
        redis_server: RedisServer) -> None:
    ns = "take-" + uuid.uuid4().hex[:8]
    await first_replica(redis_server.url, ns)
    b = Reconciler(configstore.connect(redis_server.url))  # replica B, just active
    try:
        b.rejudge_keys(ns)  # a key event it saw while passive: no reconcile of a scope it never served
        assert ns not in b.next_expiries()
        out = await b.reconcile(ns, [], records(ns))  # a resync from kopf's index, not filled yet
        assert not out.failed, out
        assert await served_state(b.redis, ns) == (["p"], KEYS), "an unfilled index emptied the document"
        # Marked deleted in the index: it leaves, and its grants with it.
        out = await b.reconcile(ns, [policy(ns, deleted=True)], records(ns))
        assert out.pushed and not out.failed, out
        assert await served_state(b.redis, ns) == ([], 0)
    finally:
        await b.close()


async def test_only_a_delete_handler_or_a_complete_index_removes_a_missing_policy(
        redis_server: RedisServer) -> None:
    for how in ("deleting", "complete"):
        ns = f"gone-{how}-" + uuid.uuid4().hex[:6]
        await first_replica(redis_server.url, ns)
        b = Reconciler(configstore.connect(redis_server.url))
        try:
            await b.reconcile(ns, [], records(ns))
            assert await served_state(b.redis, ns) == (["p"], KEYS)
            if how == "deleting":
                b.deleting(ns, "p")
            out = await b.reconcile(ns, [], records(ns), complete=how == "complete")
            assert out.pushed and not out.failed, out
            assert await served_state(b.redis, ns) == ([], 0), how
        finally:
            await b.close()


async def test_the_resync_expires_keys_only_in_scopes_kopf_serves(redis_server: RedisServer) -> None:
    """A scope with an expiry due that kopf's index does not serve (yet) is not reconciled."""
    ns = "exp-" + uuid.uuid4().hex[:8]
    await first_replica(redis_server.url, ns)
    b = Reconciler(configstore.connect(redis_server.url))
    reconciled: list[str] = []
    index: dict[str, Sequence[Mapping[str, Any]]] = {}

    async def reconcile(scope: str) -> None:
        reconciled.append(scope)
        await b.reconcile(scope, list(index.get(scope, [])), records(scope))

    async def nothing(*_: Any) -> None:
        return None

    hooks = Hooks(served=lambda: index, restore=nothing, reconcile=reconcile, write_status=nothing)
    resync = Resync(30, b, HeartbeatView(b.redis, 30), Standalone(), hooks)
    try:
        await b.reconcile(ns, [policy(ns)], records(ns))  # served here before, then paused
        b.rejudge_keys(ns)
        assert ns in b.next_expiries()
        assert await resync.expire()
        assert reconciled == [] and ns not in b.next_expiries()
        index[ns] = [policy(ns)]  # kopf has filled it
        b.rejudge_keys(ns)
        assert await resync.expire()
        assert reconciled == [ns]
        assert await served_state(b.redis, ns) == (["p"], KEYS)
    finally:
        await b.close()
