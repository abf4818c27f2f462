"""The operator (kopf) against kmock's Kubernetes emulator and a real Redis: policies and key
Secrets in, the namespace's config in Redis out, status conditions, last good config kept."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import kmock
import kopf
import pytest
from kubernetes import client as k8s_client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE
from sluice_core.parse import parse_policy
from sluice_operator.handlers import build_registry
from sluice_operator.metrics import OperatorMetrics
from sluice_operator.reconcile import Reconciler
from sluice_operator.settings import OperatorSettings
from support.operator_thread import OperatorThread
from support.polling import eventually, wait_for

RLP = "sluice.dev/v1alpha1/ratelimitpolicies"


def policy(name: str, ns: str, *, requests: Any = 10, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1", "generation": 1,
                     "uid": str(uuid.uuid4())},
        "spec": {"tiers": [{"name": "free", "requests": requests, "period": "1m"},
                           {"name": "pro", "requests": 100, "period": "1m"}], **(extra or {})},
    }


def key_secret(name: str, ns: str, policy_name: str, key: str, tier: str, **more: str) -> dict[str, Any]:
    data = {"key": key, "tier": tier, **more}
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1", "uid": str(uuid.uuid4()),
                         "labels": {"sluice.dev/policy": policy_name}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


@dataclass
class Env:
    k8s: Any
    redis: Any  # a redis-py client of the test's own, for raw commands
    store: configstore.Client  # the test loop's (the operator's client is in the operator's loop)
    ns: str
    metrics: OperatorMetrics
    reconciler: Reconciler

    async def create(self, path: str, obj: dict[str, Any]) -> None:
        async with self.k8s.post(path, json=obj) as r:
            assert r.status < 300, await r.text()

    async def patch(self, path: str, obj: dict[str, Any]) -> None:
        async with self.k8s.patch(path, json=obj, headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status < 300, await r.text()

    async def delete(self, path: str) -> None:
        async with self.k8s.delete(path) as r:
            assert r.status < 300, await r.text()

    def rlp_path(self, name: str = "") -> str:
        base = f"/apis/sluice.dev/v1alpha1/namespaces/{self.ns}/ratelimitpolicies"
        return f"{base}/{name}" if name else base

    def secret_path(self, name: str = "") -> str:
        base = f"/api/v1/namespaces/{self.ns}/secrets"
        return f"{base}/{name}" if name else base

    async def config(self) -> Any:
        return await configstore.read(self.store, self.ns)

    async def grant(self, api_key: str, policy_name: str = "api") -> Any:
        """The key's grant in Redis under the namespace's policy (None: none)."""
        return await configstore.get_grant(self.store, f"{self.ns}/{policy_name}",
                                           bytes.fromhex(keyschema.hash_api_key(api_key)))

    async def config_that(self, ok: Callable[[Any], bool]) -> Any:
        """The namespace's config if there is one and ``ok`` holds for it, else None."""
        cfg = await self.config()
        return cfg if cfg is not None and ok(cfg) else None

    def status(self, name: str) -> dict[str, Any]:
        obj = self.k8s.objects[RLP, self.ns, name]
        return dict(obj.get("status") or {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


@contextlib.asynccontextmanager
async def running_operator(kmock: Any, redis_server: Any, **settings_kw: Any) -> AsyncIterator[Env]:
    """kopf in its own thread and loop (it cancels every task of its loop when it stops),
    logged in to kmock; see ../shared/TESTING.md."""
    kmock.resources.load_bundled()
    kmock.resources[RLP] = kmock_info()
    # kmock cannot list cluster-scoped Namespaces (its path parser wants a namespace after
    # /namespaces), which ClusterRateLimitPolicies watch: they are tested against the real API
    # server (tests/k8s/test_k8s_cluster_policy.py).
    settings_kw.setdefault("cluster_policies", False)
    settings_kw.setdefault("resync_interval_s", 1.0)
    settings = OperatorSettings(redis=redis_server.url, heartbeat_stale_s=30, **settings_kw)
    metrics = OperatorMetrics()
    url = str(kmock.url).rstrip("/")
    # The operator's client is used and closed (kopf's cleanup) in the operator's loop.
    # Its own count of writes: the session's Redis is shared, and an operator of another test
    # counting under the same scope would look like a Redis that lost writes (or hide a loss).
    reconciler = Reconciler(configstore.connect(redis_server.url), metrics, scope=f"test-{uuid.uuid4().hex[:8]}")
    registry = build_registry(settings, reconciler,
                              api_client=lambda: k8s_client.ApiClient(k8s_client.Configuration(host=url)))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url)

    operator = OperatorThread(registry=registry, clusterwide=True, standalone=True)
    try:
        await eventually(operator.started, "operator ready")
        async with configstore.connect(redis_server.url) as store:
            with redis_server.client() as redis:
                yield Env(kmock, redis, store, "ns-" + uuid.uuid4().hex[:8], metrics, reconciler)
    finally:
        await asyncio.to_thread(operator.stop)  # fails the test if the operator does not stop


@pytest.fixture
async def env(kmock: Any, redis_server: Any) -> AsyncIterator[Env]:
    async with running_operator(kmock, redis_server) as e:
        yield e


def kmock_info() -> Any:
    return kmock.ResourceInfo(namespaced=True, kind="RateLimitPolicy", singular="ratelimitpolicy",
                              verbs={"list", "watch", "get", "patch", "create", "delete", "update"},
                              shortnames={"rlp"}, subresources={"status"})


async def test_policy_lifecycle_create_update_delete(env: Env) -> None:
    await env.create(env.rlp_path(), policy("api", env.ns))
    cfg = await eventually(env.config, "config in Redis")
    assert [p.name for p in cfg.policies] == ["api"]
    assert cfg.policies[0].tiers["free"].limit.requests == 10
    first = cfg.version
    status = await eventually(lambda: condition(env.status("api"), "Programmed"), "status")
    assert status["status"] == "True"
    assert condition(env.status("api"), "Accepted")["status"] == "True"

    await env.patch(env.rlp_path("api"), {"metadata": {"generation": 2},
                                          "spec": {"tiers": [{"name": "free", "requests": 20, "period": "1m"}]}})
    cfg = await eventually(lambda: env.config_that(lambda c: c.version > first), "new version")
    assert cfg.policies[0].tiers["free"].limit.requests == 20

    await env.delete(env.rlp_path("api"))
    await eventually(lambda: env.config_that(lambda c: not c.policies),
                     "an empty config (sidecars stop limiting) on delete")
    text = generate_latest(env.metrics.registry).decode()
    assert 'sluice_operator_reconciles_total{result="ok"}' in text
    assert "sluice_operator_config_pushes_total" in text


async def test_invalid_update_keeps_last_good_config(env: Env) -> None:
    await env.create(env.rlp_path(), policy("api", env.ns))
    cfg = await eventually(env.config, "config in Redis")
    await env.patch(env.rlp_path("api"), {"metadata": {"generation": 2},
                                          "spec": {"tiers": [{"name": "free", "requests": -5, "period": "1m"}]}})
    accepted = await eventually(
        lambda: (c := condition(env.status("api"), "Accepted")) and c["status"] == "False" and c, "refusal")
    policies = generate_latest(env.metrics.registry).decode()
    assert 'sluice_operator_policies{condition="Accepted",status="False"} 1.0' in policies
    assert "spec.tiers[0].requests: must be a positive integer, got -5" in accepted["message"]
    assert "last good version keeps serving" in accepted["message"]
    still = await env.config()
    assert still.version == cfg.version  # nothing new was written
    assert still.policies[0].tiers["free"].limit.requests == 10


async def test_flushall_config_is_back_with_a_higher_version(env: Env) -> None:
    await env.create(env.rlp_path(), policy("api", env.ns))
    cfg = await eventually(env.config, "config in Redis")
    env.redis.delete(keyschema.config_key(env.ns))  # what FLUSHALL does to this namespace
    back = await eventually(env.config, "config re-pushed by the resync timer")
    assert back.version > cfg.version
    assert [p.name for p in back.policies] == ["api"]


async def test_a_redis_rolled_back_to_an_older_snapshot_gets_the_current_config(env: Env) -> None:
    """What a Redis restored from an older snapshot looks like: the document of an earlier
    version, and the operator's count of its writes from then. The resync sees the count is
    not the one it wrote (it no longer reads every document) and writes the current config."""
    await env.create(env.rlp_path(), policy("api", env.ns, requests=10))
    first = await eventually(env.config, "config in Redis")
    old_doc = env.redis.hget(keyschema.config_key(env.ns), "doc")
    old_epoch = int(env.redis.hget(keyschema.OPERATOR_EPOCH_KEY, env.reconciler.scope))
    await env.patch(env.rlp_path("api"), {"spec": policy("api", env.ns, requests=20)["spec"]})
    await eventually(lambda: env.config_that(lambda c: c.policies[0].tiers["free"].limit.requests == 20),
                     "the edit in Redis")
    env.redis.hset(keyschema.config_key(env.ns), mapping={"doc": old_doc, "version": first.version})
    env.redis.hset(keyschema.OPERATOR_EPOCH_KEY, env.reconciler.scope, old_epoch)
    back = await eventually(lambda: env.config_that(lambda c: c.policies[0].tiers["free"].limit.requests == 20),
                            "the current config written again")
    assert back.version > first.version


async def test_a_snapshot_restored_between_a_write_and_its_count_is_noticed(redis_server: Any) -> None:
    """The rollback test's race, made to happen: the config written, an older snapshot (its
    document and its count of writes) restored, then the write counted. The count rises by one
    from the snapshot's, so only reading back what was written tells the loss."""
    ns = "snap-" + uuid.uuid4().hex[:8]
    async with configstore.connect(redis_server.url) as client:
        reconciler = Reconciler(client, scope=f"test-{uuid.uuid4().hex[:8]}")
        await reconciler.start_counting()
        first = await reconciler.reconcile(ns, [policy("api", ns, requests=10)], [])
        assert await reconciler.intact()
        key = keyschema.config_key(ns)
        snapshot = (await client.redis.hgetall(key),
                    await client.redis.hget(keyschema.OPERATOR_EPOCH_KEY, reconciler.scope))
        edited = {**policy("api", ns, requests=20), "metadata": {"name": "api", "namespace": ns}}
        doc = configdoc.build_doc(ns, [parse_policy(edited, default_namespace=ns)])
        version = await configstore.publish(client, ns, doc, min_version=first.version + 1)  # the write...
        await client.redis.hset(key, mapping=snapshot[0])  # ...the snapshot restored...
        await client.redis.hset(keyschema.OPERATOR_EPOCH_KEY, reconciler.scope, snapshot[1])
        await reconciler.count_write((ns, version))  # ...and the write counted
        assert not await reconciler.intact()


async def test_key_secret_lifecycle(env: Env) -> None:
    await env.create(env.rlp_path(), policy("api", env.ns))
    await eventually(env.config, "config in Redis")
    await env.create(env.secret_path(), key_secret("k1", env.ns, "api", "sk-live-123", "pro"))
    stored = await eventually(lambda: env.grant("sk-live-123"), "grant")
    assert stored.grant.tier == "pro" and stored.key_id == f"{env.ns}/k1"
    cfg = await env.config()
    assert "api" not in cfg.grants  # no sidecar lacks grants here: the document carries no keys
    # revoke without deleting
    await env.patch(env.secret_path("k1"), {"data": {"disabled": base64.b64encode(b"true").decode()}})
    await eventually(lambda: _none(env.grant("sk-live-123")), "revocation")
    # an expiring key disappears when it expires
    soon = __import__("datetime").datetime.now(__import__("datetime").UTC) + __import__("datetime").timedelta(seconds=2)
    await env.create(env.secret_path(), key_secret("k2", env.ns, "api", "sk-temp", "free",
                                                   expiresAt=soon.isoformat()))
    await eventually(lambda: env.grant("sk-temp"), "temporary grant")
    await eventually(lambda: _none(env.grant("sk-temp")), "expiry", timeout=10)


async def _none(value: Any) -> bool:
    return await value is None


async def test_an_expiring_key_goes_when_it_expires_not_at_the_resync(kmock: Any, redis_server: Any) -> None:
    """The resync task wakes when the first key expires (here its interval is 5 minutes), and
    again when a Secret event brings an earlier one."""
    import datetime as dt

    async with running_operator(kmock, redis_server, resync_interval_s=300.0) as env:
        await env.create(env.rlp_path(), policy("api", env.ns))
        await eventually(env.config, "config in Redis")
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
        await env.create(env.secret_path(), key_secret("later", env.ns, "api", "sk-later", "free",
                                                       expiresAt=later.isoformat()))
        await eventually(lambda: env.grant("sk-later"), "the later key")
        # a second key that expires sooner: the resync, asleep until `later`, must wake for it.
        # Its expiry is taken just before it is created (an expired key is skipped, never
        # granted); the upper bound is far below the 300 s resync, so only the wake removes it.
        sooner = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        await env.create(env.secret_path(), key_secret("sooner", env.ns, "api", "sk-sooner", "free",
                                                       expiresAt=sooner.isoformat()))
        await eventually(lambda: env.grant("sk-sooner"), "the sooner key")
        await eventually(lambda: _none(env.grant("sk-sooner")), "expiry", timeout=35)
        gone = dt.datetime.now(dt.UTC)
        assert sooner <= gone < sooner + dt.timedelta(seconds=30), (sooner, gone)
        assert await env.grant("sk-later") is not None


async def test_key_secret_changes_reach_the_policy_status_before_the_resync(kmock: Any, redis_server: Any) -> None:
    """A key Secret added, unusable, revoked or expired: the policy's status (keys, key
    problems) follows within seconds, not at the resync 5 minutes away."""
    import datetime as dt

    async with running_operator(kmock, redis_server, resync_interval_s=300.0) as env:
        await env.create(env.rlp_path(), policy("api", env.ns))
        await eventually(lambda: condition(env.status("api"), "Programmed"), "first status")
        assert env.status("api")["keys"] == 0

        await env.create(env.secret_path(), key_secret("k1", env.ns, "api", "sk-status-1", "pro"))
        await eventually(lambda: env.grant("sk-status-1"), "grant in Redis")
        await eventually(lambda: env.status("api").get("keys") == 1, "status keys: 1", timeout=5)

        await env.create(env.secret_path(), key_secret("k2", env.ns, "api", "sk-status-2", "platinum"))
        await eventually(lambda: "k2" in condition(env.status("api"), "Accepted")["message"],
                         "the unusable Secret named in Accepted", timeout=5)
        assert "platinum" in condition(env.status("api"), "Accepted")["message"]

        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        await env.create(env.secret_path(), key_secret("k3", env.ns, "api", "sk-status-3", "free",
                                                       expiresAt=soon.isoformat()))
        await eventually(lambda: env.status("api").get("keys") == 2, "status keys: 2", timeout=5)
        await eventually(lambda: env.status("api").get("keys") == 1, "status keys: 1 after expiry",
                         timeout=15)

        await env.patch(env.secret_path("k1"), {"data": {"disabled": base64.b64encode(b"true").decode()}})
        await eventually(lambda: _none(env.grant("sk-status-1")), "revocation")
        await eventually(lambda: env.status("api").get("keys") == 0, "status keys: 0", timeout=5)


async def web_0(env: Env, tmp_path: Any) -> tuple[Any, Any]:
    """An upstream and a real sidecar process of the test's namespace in cluster mode, pod
    ``web-0`` labelled ``app=web`` (heartbeats on): close both."""
    from support.processes import SidecarProcess, UpstreamProcess

    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    up = await asyncio.to_thread(UpstreamProcess)
    url = env.redis.connection_pool.connection_kwargs
    sidecar = await asyncio.to_thread(
        SidecarProcess, up.url, "--redis", f"redis://{url['host']}:{url['port']}",
        "--namespace", env.ns, "--pod-labels", str(labels), "--pod-name", "web-0")
    return up, sidecar


async def test_contract_operator_to_sidecar_process_to_status(env: Env, tmp_path: Any) -> None:
    """The operator writes config -> a real sidecar process in cluster mode enforces it ->
    the policy's status shows one sidecar enforcing that version."""
    from support.processes import http_get

    await env.create(env.rlp_path(), policy("api", env.ns, requests=2))
    cfg = await eventually(env.config, "config in Redis")
    up, sidecar = await web_0(env, tmp_path)
    try:
        codes = [(await asyncio.to_thread(http_get, sidecar.url + "/"))[0] for _ in range(3)]
        assert codes == [200, 200, 429]
        status = await eventually(
            lambda: (s := env.status("api")).get("enforcedSidecars") == 1 and s, "Enforced: 1")
        assert status["configVersion"] == cfg.version
        assert condition(status, "Enforced")["status"] == "True"
        # The policy deleted: the sidecar stops limiting (it would keep its last good config
        # if the document were merely missing, as after a Redis restart).
        await env.delete(env.rlp_path("api"))

        async def unlimited() -> bool:
            replies = [await asyncio.to_thread(http_get, sidecar.url + "/") for _ in range(3)]
            return all(code == 200 for code, _ in replies)

        await wait_for(unlimited, timeout=15, what="the sidecar to stop limiting")
    finally:
        await asyncio.to_thread(sidecar.close)
        await asyncio.to_thread(up.close)


async def test_webhooks_served_and_registered_with_their_ca(kmock: Any, redis_server: Any,
                                                             tmp_path: Any) -> None:
    import json
    import ssl

    import aiohttp
    from sluice_operator.webhook_config import Endpoint
    from support.redis_servers import pick_port

    port = pick_port()
    endpoint = Endpoint(url=f"https://127.0.0.1:{port}")
    async with running_operator(kmock, redis_server, webhook_listen=f"127.0.0.1:{port}",
                                webhook_cert_dir=str(tmp_path / "certs"), webhook_provided_cert_dir=None,
                                webhook_dns_names=("localhost",), webhook_ips=("127.0.0.1",),
                                webhook_endpoint=endpoint, webhook_cert_check_s=0.5):
        key = ("admissionregistration.k8s.io/v1/validatingwebhookconfigurations", None, "sluice-policies")
        vwc = await eventually(lambda: kmock.objects[key].raw, "validating configuration")
        hook = vwc["webhooks"][0]
        assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{port}/validate-policy"
        assert hook["failurePolicy"] == "Fail"
        ca = base64.b64decode(hook["clientConfig"]["caBundle"])
        mkey = ("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", None, "sluice-injector")
        mwc = await eventually(lambda: kmock.objects[mkey].raw, "mutating configuration")
        assert mwc["webhooks"][0]["failurePolicy"] == "Ignore"
        # The API server's view: call the configured URL trusting only the configured CA.
        ctx = ssl.create_default_context(cadata=ca.decode())
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u-1", "operation": "CREATE", "namespace": "ns",
            "kind": {"group": "sluice.dev", "version": "v1alpha1", "kind": "RateLimitPolicy"},
            "object": policy("bad", "ns", requests=-5)}}
        async with aiohttp.ClientSession() as http, http.post(
                hook["clientConfig"]["url"], json=review, ssl=ctx) as r:
            answer = json.loads(await r.text())
        assert answer["response"]["uid"] == "u-1"
        assert answer["response"]["allowed"] is False
        assert "spec.tiers[0].requests: must be a positive integer, got -5" in answer["response"]["status"]["message"]

        # Something drops the CA bundle (kubectl replace, helm upgrade --force): without it the
        # API server refuses every policy. The periodic check puts it back.
        url = f"{str(kmock.url).rstrip('/')}/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/sluice-policies"
        stripped = {**hook, "clientConfig": {"url": hook["clientConfig"]["url"]}}
        async with aiohttp.ClientSession() as http, http.patch(
                url, json={"webhooks": [stripped]},
                headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status < 300, await r.text()
            assert "caBundle" not in (await r.json())["webhooks"][0]["clientConfig"]
        back = await eventually(
            lambda: kmock.objects[key].raw["webhooks"][0]["clientConfig"].get("caBundle"),
            "the CA bundle put back")
        assert base64.b64decode(back) == ca


# The reconcile loop itself (no kopf): restarts and an unreachable Redis ----------------------
async def test_a_restarted_operator_keeps_the_last_good_version_of_an_invalid_policy(redis_server: Any) -> None:
    ns = "rs-" + uuid.uuid4().hex[:8]
    async with configstore.connect(redis_server.url) as client:
        first = await Reconciler(client).reconcile(ns, [policy("api", ns, requests=10)], [])
        assert first.programmed and first.version
        # A new operator process (nothing in memory) meets an invalid update of the same policy.
        again = await Reconciler(client).reconcile(ns, [policy("api", ns, requests=-5)], [])
        result = again.results["api"]
        assert not result.accepted and result.serving, result
        assert again.version == first.version and not again.pushed
        cfg = await configstore.read(client, ns)
    assert cfg.version == first.version and cfg.policies[0].tiers["free"].limit.requests == 10


async def test_with_redis_unreachable_status_still_says_what_is_valid() -> None:
    from support.redis_servers import pick_port

    ns = "down-" + uuid.uuid4().hex[:8]
    async with configstore.connect(f"redis://127.0.0.1:{pick_port()}", timeout=0.5) as client:  # nobody listens
        out = await Reconciler(client).reconcile(ns, [policy("good", ns), policy("bad", ns, requests=-5)], [])
    assert out.redis_error and not out.programmed
    assert out.results["good"].accepted and not out.results["bad"].accepted
    assert "spec.tiers[0].requests" in out.results["bad"].message


def test_only_namespace_label_changes_re_resolve_cluster_policies() -> None:
    from sluice_operator.handlers import LabelChanges

    changes = LabelChanges()
    # first seen in a listing: the resume handlers resolved against the full index already
    assert not changes.changed(None, "shop", {"team": "a"})
    assert not changes.changed("MODIFIED", "shop", {"team": "a"})  # annotations, status...
    assert changes.changed("MODIFIED", "shop", {"team": "b"})
    assert not changes.changed(None, "shop", {"team": "b"})  # a re-list after a watch gap
    assert changes.changed("DELETED", "shop", {"team": "b"})
    assert changes.changed("ADDED", "shop", {"team": "b"})  # re-created: scopes may change
    assert changes.changed("ADDED", "new", {})  # created while watching


async def test_a_deleted_namespace_leaves_nothing_behind(redis_server: Any) -> None:
    """Its empty config document goes from Redis; one written since (the namespace re-created,
    a new policy) stays."""
    ns = "gone-" + uuid.uuid4().hex[:8]
    async with configstore.connect(redis_server.url) as client:
        reconciler = Reconciler(client)
        await reconciler.reconcile(ns, [policy("api", ns)], [])
        await reconciler.reconcile(ns, [], [], complete=True)  # its last policy deleted: an empty document
        assert not (await configstore.read(client, ns)).policies
        await reconciler.forget(ns)
        assert not await client.redis.exists(keyschema.config_key(ns))
        assert reconciler.latest(ns) is None

        # re-created under the same name by another operator replica: its policy stays
        await Reconciler(client).reconcile(ns, [policy("api", ns)], [])
        await reconciler.forget(ns)
        assert [p.name for p in (await configstore.read(client, ns)).policies] == ["api"]


async def cluster_doc(client: configstore.Client) -> Any:
    return await configstore.read(client, CLUSTER_SCOPE)


async def test_the_cluster_document_exists_without_any_policy_and_comes_back_after_flushall(
        kmock: Any, fresh_redis: Any) -> None:
    """No policy anywhere, cluster policies off: the empty cluster document is written at
    start-up (a sidecar of a namespace without a policy then knows it is under none) and written
    again after Redis lost it, though no policy's resync timer runs."""
    async with running_operator(kmock, fresh_redis) as env:
        first = await eventually(lambda: cluster_doc(env.store), "cluster document at start-up")
        assert first.policies == () and first.placeholder
        env.redis.flushall()
        back = await eventually(lambda: cluster_doc(env.store), "cluster document after FLUSHALL")
        assert back.policies == () and back.placeholder
        assert back.version > first.version  # versions keep rising


async def test_after_flushall_a_namespace_policy_comes_back_and_then_the_cluster_document(
        kmock: Any, fresh_redis: Any) -> None:
    async with running_operator(kmock, fresh_redis) as env:
        await env.create(env.rlp_path(), policy("api", env.ns))
        before = await eventually(env.config, "config in Redis")
        assert await cluster_doc(env.store) is not None
        env.redis.flushall()
        back = await eventually(lambda: cluster_doc(env.store), "cluster document after FLUSHALL")
        assert back.placeholder
        # Written after every namespace's config (restore_all): the policy is back already.
        cfg = await env.config()
        assert cfg is not None and [p.name for p in cfg.policies] == ["api"]
        assert cfg.version > before.version


async def test_the_operator_closes_its_redis_connections_when_it_stops(kmock: Any, fresh_redis: Any) -> None:
    """At exit, not whenever the garbage collector gets to its client (here still referenced)."""
    async with running_operator(kmock, fresh_redis) as env:
        await eventually(lambda: cluster_doc(env.store), "the operator's first write")

    def connected() -> int:  # this probe's own connection included
        return int(fresh_redis.execute("INFO", "clients")["connected_clients"])

    await eventually(lambda: connected() == 1, "the operator's connections closed")
    assert env.reconciler is not None


async def test_grants_lost_from_redis_are_written_again(env: Env) -> None:
    """Redis lost everything (here: the document and the grant): the resync writes the config
    and, in full, the key grants again."""
    await env.create(env.rlp_path(), policy("api", env.ns))
    await eventually(env.config, "config in Redis")
    await env.create(env.secret_path(), key_secret("k1", env.ns, "api", "sk-lost-1", "pro"))
    await eventually(lambda: env.grant("sk-lost-1"), "grant")
    pid = keyschema.policy_id(f"{env.ns}/api")
    raw = bytes.fromhex(keyschema.hash_api_key("sk-lost-1"))
    env.redis.delete(keyschema.config_key(env.ns), keyschema.grant_key(pid, keyschema.client_for_api_key(raw)),
                     keyschema.grant_index_key(pid))
    back = await eventually(lambda: env.grant("sk-lost-1"), "grant written again")
    assert back.key_id == f"{env.ns}/k1"
    await eventually(env.config, "the document written again (after the grants)")


async def test_a_sidecar_stuck_on_an_old_config_is_counted_behind_until_it_catches_up(
        env: Env, tmp_path: Any) -> None:
    """``sluice_operator_sidecars_behind`` (the SluicePolicyNotEnforced alert): a real sidecar
    frozen (SIGSTOP) keeps its last heartbeat, fresh and at the old version, while the policy
    changes; it is counted behind until, thawed, it reloads and beats the new version."""
    def behind() -> float | None:
        text = generate_latest(env.metrics.registry).decode()
        for fam in text_string_to_metric_families(text):
            if fam.name == "sluice_operator_sidecars_behind":
                return sum(s.value for s in fam.samples if s.labels.get("namespace") == env.ns)
        raise AssertionError("sluice_operator_sidecars_behind is not exported")

    await env.create(env.rlp_path(), policy("api", env.ns, requests=2))
    first = (await eventually(env.config, "config in Redis")).version
    up, sidecar = await web_0(env, tmp_path)
    try:
        await eventually(lambda: env.status("api").get("enforcedSidecars") == 1, "Enforced: 1")
        assert behind() == 0
        sidecar.proc.send_signal(signal.SIGSTOP)
        await env.patch(env.rlp_path("api"), {"metadata": {"generation": 2},
                                              "spec": {"tiers": [{"name": "free", "requests": 5, "period": "1m"}]}})
        await eventually(lambda: env.config_that(lambda c: c.version > first), "new version")
        await eventually(lambda: behind() == 1, "the frozen sidecar counted behind")
        sidecar.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: behind() == 0, "the thawed sidecar no longer behind")
    finally:
        sidecar.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(sidecar.close)
        await asyncio.to_thread(up.close)
