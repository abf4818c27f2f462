"""Documents stop embedding API keys only on positive evidence that every sidecar reads Redis
grants: a live per-namespace heartbeat (the oldest releases), at any time, keeps them; a
namespace where no sidecar beats keeps its document as it is; ``--embed-keys always/never``
overrules the heartbeats. A private redis-server each (the global heartbeat set is shared)."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import KeyGrant
from sluice_core.parse import parse_policy
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.keysecrets import POLICY_LABEL, SecretKey, read_secret
from sluice_operator.reconcile import Reconciler
from support.redis_servers import RedisServer

KEYS = 3
GRANTS = frozenset({keyschema.CAPABILITY_REDIS_GRANTS})


def policy(ns: str) -> dict[str, Any]:
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "p", "namespace": ns, "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
                     "apiKeys": {"header": "X-API-Key", "required": True},
                     "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}


def api_keys(ns: str) -> list[str]:
    return [f"key-{ns}-{i}" for i in range(KEYS)]


def records(ns: str) -> list[SecretKey]:
    out = []
    for i, key in enumerate(api_keys(ns)):
        body = {"metadata": {"name": f"k{i}", "namespace": ns, "labels": {POLICY_LABEL: "p"}},
                "data": {"key": base64.b64encode(key.encode()).decode(), "tier": base64.b64encode(b"free").decode()}}
        record = read_secret(body, POLICY_LABEL)
        assert record is not None
        out.append(record)
    return out


def beat(server: RedisServer, ns: str, pod: str, capabilities: frozenset[str] | None) -> None:
    member = keyschema.heartbeat_member(ns, pod, keyschema.Heartbeat(1, 0.0, "p", capabilities=capabilities))
    server.execute("ZADD", keyschema.HEARTBEATS_KEY, str(time.time()), member)


async def older_operator_wrote(client: configstore.Client, ns: str) -> None:
    """A document with embedded keys, as operators before grants wrote them."""
    embedded = {"p": {keyschema.hash_api_key(k): KeyGrant("free") for k in api_keys(ns)}}
    await configstore.publish(client, ns, configdoc.build_doc(ns, [parse_policy(policy(ns))], embedded))


async def embedded(client: configstore.Client, ns: str) -> int:
    return len((await configstore.read(client, ns)).grants.get("p", {}))


async def test_an_old_sidecar_that_appears_after_a_scan_found_none_keeps_the_keys_embedded(
        fresh_redis: RedisServer) -> None:
    ns = "late-" + uuid.uuid4().hex[:6]
    async with configstore.connect(fresh_redis.url) as client:
        view = HeartbeatView(client, stale_s=30)
        beat(fresh_redis, ns, "new-0", GRANTS)
        for _ in range(3):  # refreshes that find no per-namespace heartbeat
            await view.refresh([ns])
        assert view.grants_ready(ns) is True
        fresh_redis.execute("HSET", keyschema.heartbeat_key(ns), "old-0",
                            keyschema.Heartbeat(1, time.time(), "p").encode())  # a rollback
        await view.refresh([ns])
        assert view.grants_ready(ns) is False
        assert view.grants_ready(None) is False


async def test_no_heartbeat_at_all_keeps_the_document_as_it_is(fresh_redis: RedisServer) -> None:
    ns, fresh_ns = "quiet-" + uuid.uuid4().hex[:6], "new-" + uuid.uuid4().hex[:6]
    async with configstore.connect(fresh_redis.url) as client:
        await older_operator_wrote(client, ns)
        reconciler = Reconciler(client)
        view = HeartbeatView(client, stale_s=30)
        reconciler.grants_ready = view.grants_ready
        await view.refresh([ns, fresh_ns])
        assert view.grants_ready(ns) is None and view.grants_ready(None) is None
        out = await reconciler.reconcile(ns, [policy(ns)], records(ns), complete=True)
        assert out.programmed and not out.failed, out
        assert await embedded(client, ns) == KEYS, "no sidecar beats: the keys stay in the document"
        assert not reconciler.embedding_changes(ns)
        await reconciler.reconcile(fresh_ns, [policy(fresh_ns)], records(fresh_ns), complete=True)
        assert await embedded(client, fresh_ns) == 0, "a new document: grants only"
        beat(fresh_redis, ns, "new-0", GRANTS)  # positive evidence: the keys leave
        await view.refresh([ns, fresh_ns])
        assert reconciler.embedding_changes(ns)
        await reconciler.reconcile(ns, [policy(ns)], records(ns), complete=True)
        assert await embedded(client, ns) == 0


async def test_embed_keys_always_or_never_overrules_the_heartbeats(fresh_redis: RedisServer) -> None:
    ns = "force-" + uuid.uuid4().hex[:6]
    async with configstore.connect(fresh_redis.url) as client:
        reconciler = Reconciler(client)
        view = HeartbeatView(client, stale_s=30)
        reconciler.grants_ready = view.grants_ready
        beat(fresh_redis, ns, "new-0", GRANTS)
        await view.refresh([ns])
        reconciler.embed_keys = "always"
        await reconciler.reconcile(ns, [policy(ns)], records(ns), complete=True)
        assert await embedded(client, ns) == KEYS
        beat(fresh_redis, ns, "old-0", None)
        await view.refresh([ns])
        reconciler.embed_keys = "never"
        assert reconciler.embedding_changes(ns)
        await reconciler.reconcile(ns, [policy(ns)], records(ns), complete=True)
        assert await embedded(client, ns) == 0
