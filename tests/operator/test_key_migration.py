"""Migrating an install whose documents embed API keys (what operators before grants wrote) to
Redis grants, with real Redis and a real sidecar process, and a client asking with keys the
whole time: never a 401.

The operator's reconcile (no kopf: what its handlers call) writes every key's grant first and
keeps embedding the keys while a fresh sidecar heartbeat lacks the ``grants`` capability; once
none does, the document without keys is published, and the sidecar switches to the grants,
which are all there. The older sidecar is its heartbeat as such a sidecar writes it (no
capabilities field): a process of that release is not kept around to run."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE, KeyGrant
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.keysecrets import CLUSTER_POLICY_LABEL, POLICY_LABEL, SecretKey, read_secret
from sluice_operator.reconcile import Reconciler
from support import key_sidecar
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess

KEYS = 12
DEADLINE = 15.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def policy_body(kind: str, name: str, ns: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
        "apiKeys": {"header": "X-API-Key", "required": True},
        "tiers": [{"name": "free", "requests": 1_000_000, "period": "1h"}]}
    meta: dict[str, Any] = {"name": name, "generation": 1}
    if ns:
        meta["namespace"] = ns
    else:
        spec["namespaceSelector"] = {"matchLabels": {"migrating": "yes"}}
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def secret_keys(ns: str, policy: str, label: str, api_keys: list[str]) -> list[SecretKey]:
    """The records kopf's index holds for these key Secrets."""
    out = []
    for i, key in enumerate(api_keys):
        body = {"metadata": {"name": f"key-{i}", "namespace": ns, "labels": {label: policy}},
                "data": {"key": base64.b64encode(key.encode()).decode(), "tier": base64.b64encode(b"free").decode()}}
        record = read_secret(body, label)
        assert record is not None
        out.append(record)
    return out


class Client:
    """Asks the sidecar with each key in turn until stopped; keeps every status."""

    def __init__(self, sidecar: SidecarProcess, api_keys: list[str]) -> None:
        self.sidecar, self.keys = sidecar, api_keys
        self.statuses: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = self.keys[i % len(self.keys)]
            self.statuses.append((key_sidecar.status(self.sidecar, key), key[-6:]))
            i += 1

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.statuses


def old_sidecar_beats(r: Any, ns: str, version: int) -> str:
    """A heartbeat as a sidecar from before grants writes it: no capabilities."""
    member = keyschema.heartbeat_member(ns, "old-0", keyschema.Heartbeat(version, 0.0, "api"))
    r.zadd(keyschema.HEARTBEATS_KEY, {member: time.time()})
    return member


async def migrate(redis_server: Any, sidecar: SidecarProcess, scope: str, ns: str, body: dict[str, Any],
                  records: list[SecretKey], api_keys: list[str], labels: dict[str, dict[str, str]]) -> None:
    """An old sidecar beats: the reconcile writes the grants and keeps the keys in the document.
    It goes: the next reconcile drops them from the document. The client never hears 401."""
    name = body["metadata"]["name"]
    client = Client(sidecar, api_keys)
    reconciler = Reconciler(configstore.connect(redis_server.url))
    view = HeartbeatView(reconciler.redis, 30)
    reconciler.grants_ready = view.grants_ready
    try:
        with redis_server.client() as r:
            stored = await configstore.read(reconciler.redis, scope)
            member = old_sidecar_beats(r, ns, stored.version)
            await view.refresh([ns])
            out = await reconciler.reconcile(scope, [body], records, labels)
            assert out.programmed and not out.redis_error
            cfg = await configstore.read(reconciler.redis, scope)
            assert len(cfg.grants[name]) == len(api_keys), "an old sidecar beats: keys stay embedded"
            for key in api_keys:
                stored_grant = await configstore.get_grant(reconciler.redis, f"{scope}/{name}",
                                                           bytes.fromhex(keyschema.hash_api_key(key)))
                assert stored_grant is not None and stored_grant.key_id in {k.key_id for k in records}

            r.zrem(keyschema.HEARTBEATS_KEY, member)
            await view.refresh([ns])
            assert reconciler.embedding_changes(scope)
            out = await reconciler.reconcile(scope, [body], records, labels)
            cfg = await configstore.read(reconciler.redis, scope)
            assert name not in cfg.grants, "every sidecar reads grants: no keys in the document"
            field = "clusterVersion" if scope == CLUSTER_SCOPE else "version"
            await asyncio.to_thread(wait_until, lambda: key_sidecar.readyz(sidecar)["config"][field] == out.version,
                                    DEADLINE, what="the sidecar on the document without keys")
            seen = len(client.statuses)
            await asyncio.to_thread(wait_until, lambda: len(client.statuses) > seen + 3 * len(api_keys),
                                    DEADLINE, what="requests after the switch")
    finally:
        statuses = client.stop()
        await reconciler.close()
    assert len(statuses) > 3 * len(api_keys)
    assert {s for s, _ in statuses} == {200}, [s for s in statuses if s[0] != 200][:10]


async def test_namespace_documents_with_embedded_keys_move_to_grants_without_a_401(
        redis_server: Any, upstream: UpstreamProcess, tmp_path: Path) -> None:
    ns = "mig-" + uuid.uuid4().hex[:8]
    body = policy_body("RateLimitPolicy", "api", ns)
    api_keys = [f"sk-mig-{uuid.uuid4().hex}" for _ in range(KEYS)]
    records = secret_keys(ns, "api", POLICY_LABEL, api_keys)
    from sluice_core.parse import parse_policy

    compiled = parse_policy(body)
    embedded = {"api": {keyschema.hash_api_key(k): KeyGrant("free") for k in api_keys}}
    async with configstore.connect(redis_server.url) as store:  # what an operator before grants wrote
        await configstore.publish(store, ns, configdoc.build_doc(ns, [compiled], embedded))
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    sidecar = await asyncio.to_thread(key_sidecar.start, upstream, redis_server.url, ns, labels, "--pod-name", "web-0")
    try:
        assert await asyncio.to_thread(key_sidecar.status, sidecar, api_keys[0]) == 200
        await migrate(redis_server, sidecar, ns, ns, body, records, api_keys, {})
    finally:
        sidecar.close()


async def test_cluster_documents_with_embedded_keys_move_to_grants_without_a_401(
        redis_server: Any, upstream: UpstreamProcess, tmp_path: Path) -> None:
    ns, keys_ns = "mig-" + uuid.uuid4().hex[:8], "sluice-cluster-keys"
    name = "partners-" + uuid.uuid4().hex[:6]
    body = policy_body("ClusterRateLimitPolicy", name, None)
    api_keys = [f"sk-mig-{uuid.uuid4().hex}" for _ in range(KEYS)]
    records = secret_keys(keys_ns, name, CLUSTER_POLICY_LABEL, api_keys)
    from sluice_core.parse import parse_policy

    compiled = parse_policy(body)
    embedded = {name: {keyschema.hash_api_key(k): KeyGrant("free") for k in api_keys}}
    async with configstore.connect(redis_server.url) as store:
        await configstore.publish(store, ns, configdoc.build_doc(ns, []))
        await configstore.publish(store, CLUSTER_SCOPE, configdoc.build_doc(
            CLUSTER_SCOPE, [compiled], embedded, {name: [ns]}))
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    sidecar = await asyncio.to_thread(key_sidecar.start, upstream, redis_server.url, ns, labels, "--pod-name", "web-0")
    try:
        assert await asyncio.to_thread(key_sidecar.status, sidecar, api_keys[0]) == 200
        await migrate(redis_server, sidecar, CLUSTER_SCOPE, ns, body, records, api_keys,
                      {ns: {"migrating": "yes"}})
    finally:
        sidecar.close()
