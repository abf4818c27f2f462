"""ClusterRateLimitPolicy in the sidecar: one budget shared by the pods of several namespaces,
layered under each namespace's own policy. Real sidecars in cluster mode (in-process), real
Redis (single and a 3-master Cluster, where a pod under two policies makes two script calls on
different slots); the cluster document is written as the operator writes it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy, KeyGrant
from sluice_core.parse import parse_policy
from support.polling import wait_for
from support.sidecar_harness import RunningSidecar, Upstream, start_sidecar
from support.store_calls import store_call

PARTNER_KEY = "partner-" + uuid.uuid4().hex


def cluster_policy(name: str, requests: int, **spec: Any) -> CompiledPolicy:
    return parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "ClusterRateLimitPolicy",
                         "metadata": {"name": name},
                         "spec": {"tiers": [{"name": "free", "requests": requests, "period": "1h"}], **spec}})


def ns_policy(ns: str, name: str, requests: int) -> CompiledPolicy:
    return parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                         "metadata": {"name": name, "namespace": ns},
                         "spec": {"tiers": [{"name": "free", "requests": requests, "period": "1h"}]}})


Publish = Callable[..., Awaitable[int]]


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    server = request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")
    return str(server.url)


@pytest.fixture
async def publish(redis_url: str) -> AsyncIterator[Publish]:
    async with configstore.connect(redis_url) as client:

        async def write(ns: str, policies: list[CompiledPolicy], *, scopes: dict[str, list[str]] | None = None,
                        grants: dict[str, dict[str, KeyGrant]] | None = None) -> int:
            return await configstore.publish(client, ns, configdoc.build_doc(ns, policies, grants, scopes))

        yield write


Start = Callable[[str], Awaitable[RunningSidecar]]


@pytest.fixture
async def sidecar_in(tmp_path: Path, upstream: Upstream, redis_url: str) -> AsyncIterator[Start]:
    """``await sidecar_in(namespace)``: a sidecar in cluster mode for a pod labelled app=web."""
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    started: list[RunningSidecar] = []

    async def start(ns: str) -> RunningSidecar:
        sc = await start_sidecar(tmp_path / ns, None, upstream=upstream, redis=redis_url, policy_file=None,
                                 namespace=ns, pod_labels=str(labels), pod_name=f"web-{ns}",
                                 poll_interval_s=0.5)
        started.append(sc)
        return sc

    yield start
    for sc in reversed(started):
        await sc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, sc: RunningSidecar, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with http.get(sc.url + "/api", headers=headers) as r:
        body = await r.json(content_type=None) if r.status >= 400 else None
        return r.status, dict(r.headers), body


async def admin_config(http: aiohttp.ClientSession, sc: RunningSidecar) -> dict[str, Any]:
    async with http.get(sc.admin_url + "/admin/config") as r:
        return dict((await r.json())["config"])


def names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"cpa-{tag}", f"cpb-{tag}", f"cpc-{tag}"


async def test_one_budget_across_namespaces(publish: Publish, sidecar_in: Start, http: aiohttp.ClientSession) -> None:
    a, b, c = names()
    policy = cluster_policy("partners-" + a, 4, identify={"order": ["apiKey"]},
                            apiKeys={"header": "X-Partner-Key", "required": True})
    digest = keyschema.hash_api_key(PARTNER_KEY)
    await publish(CLUSTER_SCOPE, [policy], scopes={policy.name: [a, b]},
                  grants={policy.name: {digest: KeyGrant(tier="free")}})
    in_a, in_b, in_c = await sidecar_in(a), await sidecar_in(b), await sidecar_in(c)
    statuses = []
    for sc in (in_a, in_b) * 3:
        status, headers, _ = await get(http, sc, **{"X-Partner-Key": PARTNER_KEY})
        statuses.append(status)
        if status == 200:
            assert headers["RateLimit-Policy"] == f'"{policy.name}/free";q=4;w=3600'
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert (await get(http, in_a))[0] == 401  # the key is required in every selected namespace
    # c is not selected: not limited, no headers, no key needed.
    replies = [await get(http, in_c) for _ in range(6)]
    assert [s for s, _, _ in replies] == [200] * 6
    assert not any("RateLimit" in h for _, h, _ in replies)
    cfg = await admin_config(http, in_b)
    assert cfg["clusterPolicyRef"] == policy.name and cfg["policyRef"] is None


async def test_namespace_policy_first_then_the_shared_budget(publish: Publish, sidecar_in: Start,
                                                             http: aiohttp.ClientSession) -> None:
    a, b, c = names()
    budget = cluster_policy("budget-" + a, 5)  # per client IP: every request here is 127.0.0.1
    await publish(CLUSTER_SCOPE, [budget], scopes={budget.name: [a, b, c]})
    await publish(a, [ns_policy(a, "local", 2)])
    await publish(c, [ns_policy(c, "local", 10)])
    in_a, in_b, in_c = await sidecar_in(a), await sidecar_in(b), await sidecar_in(c)

    # a: its own limit (2) refuses first; both policies' buckets in the headers.
    first = await get(http, in_a)
    assert first[0] == 200
    assert first[1]["RateLimit-Policy"] == f'"free";q=2;w=3600, "{budget.name}/free";q=5;w=3600'
    assert first[1]["RateLimit"] == f'"free";r=1;t=0, "{budget.name}/free";r=4;t=0'
    assert (await get(http, in_a))[0] == 200
    for _ in range(3):
        status, _, problem = await get(http, in_a)
        assert status == 429 and problem["policy"] == "local", problem
    # The requests a refused did not touch the shared budget: 5 - 2 = 3 left, for b.
    assert [(await get(http, in_b))[0] for _ in range(4)] == [200, 200, 200, 429]
    # c's own limit is generous, the shared budget is spent: refused, naming the cluster policy.
    status, headers, problem = await get(http, in_c)
    assert status == 429 and problem["policy"] == budget.name, problem
    assert int(headers["Retry-After"]) >= 1


def test_heartbeats_keep_their_stored_form_across_releases() -> None:
    """During a rolling upgrade the operator reads heartbeats of sidecars of the previous
    release (and the other way round): the stored form is positional, so renaming the fields
    of :class:`keyschema.Heartbeat` must leave it as it was."""
    beat = keyschema.Heartbeat(7, 1700000000.0, "web", 3, "budget")
    assert beat.encode() == "7 1700000000 web 3 budget"
    assert keyschema.parse_heartbeat(b"7 1700000000 web 3 budget") == beat
    assert (keyschema.parse_heartbeat(b"7 1700000000 - 3 -")
            == keyschema.Heartbeat(7, 1700000000.0, None, 3, None))
    got = keyschema.parse_heartbeat(b"7 1700000000 web")  # no cluster fields
    assert (got.policy_ref, got.cluster_version, got.cluster_policy_ref) == ("web", 0, None)
    # a sixth field, capabilities: an older operator reads the first five, as before
    caps = keyschema.Heartbeat(7, 1700000000.0, "web", 3, "budget", frozenset({"b", "a"}))
    assert caps.encode() == "7 1700000000 web 3 budget a,b"
    assert keyschema.parse_heartbeat(caps.encode()) == caps
    assert keyschema.parse_heartbeat(b"7 1700000000 web 3 budget -").capabilities == frozenset()
    assert keyschema.parse_heartbeat(b"7 1700000000 web 3 budget").capabilities is None
    member = keyschema.heartbeat_member("ns", "web-0", caps)
    assert keyschema.parse_heartbeat_member(member, 1700000000.0) == ("ns", "web-0", caps)


async def test_scope_changes_reload_and_heartbeat_reports_the_cluster_policy(
        publish: Publish, sidecar_in: Start, http: aiohttp.ClientSession, redis_url: str) -> None:
    a, b, _ = names()
    budget = cluster_policy("budget-" + a, 100)
    v1 = await publish(CLUSTER_SCOPE, [budget], scopes={budget.name: [a]})
    sc = await sidecar_in(a)
    assert f'"{budget.name}/free"' in (await get(http, sc))[1]["RateLimit-Policy"]

    async def heartbeat() -> keyschema.Heartbeat | None:  # written by a background task of the sidecar
        async with configstore.connect(redis_url) as client:
            for member, at in await configstore.fresh_heartbeats(client, 0):
                parsed = keyschema.parse_heartbeat_member(member, at)
                if parsed and parsed[:2] == (a, f"web-{a}"):
                    return parsed[2]
        return None

    beat = await wait_for(heartbeat, timeout=10, what="the heartbeat")
    assert (beat.cluster_version, beat.cluster_policy_ref, beat.policy_ref) == (v1, budget.name, None)
    # It says it resolves API keys from Redis grants (what lets an operator stop embedding them).
    assert beat.capabilities == {keyschema.CAPABILITY_REDIS_GRANTS}

    # The namespace leaves the policy's scope (its labels changed): the sidecar stops applying it.
    await publish(CLUSTER_SCOPE, [budget], scopes={budget.name: [b]})

    async def unlimited() -> bool:
        return (await admin_config(http, sc))["clusterVersion"] == 0 and "RateLimit" not in (await get(http, sc))[1]

    await wait_for(unlimited, timeout=10, what="the cluster policy to stop applying")


def test_apply_needs_the_cluster_namespaces(tmp_path: Path, redis_url: str) -> None:
    f = tmp_path / "crlp.yaml"
    f.write_text("""
apiVersion: sluice.dev/v1alpha1
kind: ClusterRateLimitPolicy
metadata: {name: shared}
spec:
  namespaceSelector: {matchLabels: {team: partners}}
  tiers: [{name: free, requests: 10, period: 1m}]
""")
    cmd = [sys.executable, "-m", "sluice_core.cli", "apply", "-f", str(f), "--redis", redis_url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--cluster-namespaces" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--cluster-namespaces", "shop,billing"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "applied: namespace _cluster: shared" in r.stdout
    cfg = store_call(redis_url, configstore.read, CLUSTER_SCOPE)
    assert cfg is not None and cfg.scopes == {"shared": frozenset({"shop", "billing"})}


async def test_a_refusal_by_the_shared_budget_leaves_the_own_budget_untouched(
        publish: Publish, sidecar_in: Start, http: aiohttp.ClientSession) -> None:
    """Both policies all-or-nothing: in one script call where the store can (single Redis), and
    on a Redis Cluster (two calls, different slots) by giving the namespace policy its tokens
    back when the shared budget refuses."""
    a, _, _ = names()
    spent = cluster_policy("spent-" + a, 1)
    await publish(CLUSTER_SCOPE, [spent], scopes={spent.name: [a]})
    await publish(a, [ns_policy(a, "local", 2)])
    sc = await sidecar_in(a)
    assert (await get(http, sc))[0] == 200  # the one shared token
    refusals = [await get(http, sc) for _ in range(3)]
    assert [(status, problem["policy"]) for status, _, problem in refusals] == [(429, spent.name)] * 3
    # A bigger shared budget (a changed limit: fresh buckets); the local one still has 1 of 2.
    bigger = cluster_policy("spent-" + a, 100)
    version = await publish(CLUSTER_SCOPE, [bigger], scopes={bigger.name: [a]})

    async def reloaded() -> bool:
        return (await admin_config(http, sc))["clusterVersion"] == version

    await wait_for(reloaded, timeout=10, what="the new budget")
    assert [(await get(http, sc))[0] for _ in range(2)] == [200, 429]
