"""Readiness, the admin endpoints and hot reload of a real sidecar on loopback: /readyz before
and after a config, while draining, what /admin/config shows (never key material), a new
limit applied, buckets reset only when their limit changes, and the last good policy kept."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import aiohttp
import pytest
from sluice_sidecar.server import StartupError
from support.http_calls import (
    KEYS_POLICY,
    TRUST_LOCAL,
    call,
    metric,
    metrics_text,
)
from support.polling import wait_for
from support.sidecar_harness import (
    Factory,
    RunningSidecar,
    policy_doc,
)
from support.structured_fields import check_ratelimit_headers


# Readiness and admin ------------------------------------------------------------------------------
async def test_readyz_before_config_then_loaded(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    # No policy file yet: only an explicit --without-config unlimited starts like this, and then
    # proxies unlimited (counted) while not ready.
    sc = await sidecars(None, without_config="unlimited")
    r = await call(http, "GET", sc.admin_url + "/readyz")
    assert r.status == 503 and r.json()["ready"] is False
    assert (await call(http, "GET", sc.admin_url + "/healthz")).status == 200
    assert [(await call(http, "GET", sc.url + "/x")).status for _ in range(7)] == [200] * 7
    assert metric(await metrics_text(http, sc), "sluice_decisions_total", decision="unconfigured") == 7
    sc.write_policy(policy_doc())

    async def ready() -> bool:
        return (await call(http, "GET", sc.admin_url + "/readyz")).status == 200

    await wait_for(ready, timeout=10, what="/readyz to turn 200 after the policy appeared")
    body = (await call(http, "GET", sc.admin_url + "/readyz")).json()
    assert body["ready"] is True and body["config"]["loaded"] is True


async def test_invalid_policy_at_start_refuses_to_start_or_serves_unready(
        sidecars: Factory, http: aiohttp.ClientSession) -> None:
    bad = policy_doc(tiers=[{"name": "free", "requests": -5, "period": "1m"}])
    with pytest.raises(StartupError, match=r"^--policy-file: .*spec\.tiers\[0\]\.requests"):
        await sidecars(bad)
    sc = await sidecars(bad, without_config="unlimited")
    r = await call(http, "GET", sc.admin_url + "/readyz")
    assert r.status == 503 and r.json()["config"]["loaded"] is False


async def test_readyz_503_while_draining(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(), drain_s=0.4)
    assert (await call(http, "GET", sc.admin_url + "/readyz")).status == 200
    task = asyncio.create_task(sc.sidecar.drain())
    try:
        async def not_ready() -> bool:
            return (await call(http, "GET", sc.admin_url + "/readyz")).status == 503

        await wait_for(not_ready, timeout=5, interval=0.01, what="/readyz to turn 503 on drain")
        assert (await call(http, "GET", sc.admin_url + "/readyz")).json()["draining"] is True
        assert (await call(http, "GET", sc.url + "/still-served")).status == 200
        await asyncio.wait_for(task, 10)
    finally:
        sc.stopped = True
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sc.sidecar.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", sc.url + "/after-drain")


async def test_readyz_names_policies_and_admin_config_adds_their_manifests(
        sidecars: Factory, http: aiohttp.ClientSession) -> None:
    """One key, one meaning: a policy's name is under ``policyRef`` / ``clusterPolicyRef``;
    ``policy`` / ``clusterPolicy`` are always manifests (only /admin/config has them)."""
    sc = await sidecars(policy_doc())
    ready = (await call(http, "GET", sc.admin_url + "/readyz")).json()["config"]
    assert ready["policyRef"] == "default/test-api" and ready["clusterPolicyRef"] is None
    assert "policy" not in ready and "clusterPolicy" not in ready
    body = (await call(http, "GET", sc.admin_url + "/admin/config")).json()
    assert body["config"] == ready
    assert body["policy"]["kind"] == "RateLimitPolicy" and "clusterPolicy" not in body


async def test_admin_config_counts_keys_and_shows_no_key_material(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    hashed = "sk-stored-as-digest"
    keys = {"sk-alpha-123": "pro", "sk-beta-456": "basic",
            "sha256:" + hashlib.sha256(hashed.encode()).hexdigest(): {"tier": "pro"}}
    sc = await sidecars(policy_doc(**KEYS_POLICY), keys=keys)
    r = await call(http, "GET", sc.admin_url + "/admin/config")
    assert r.status == 200
    body = r.json()
    assert body["apiKeys"] == 3
    assert body["policy"]["metadata"]["name"] == "test-api"
    assert [t["name"] for t in body["policy"]["spec"]["tiers"]] == ["basic", "pro"]
    text = r.body.decode()
    for k in ("sk-alpha-123", "sk-beta-456", hashed):
        raw = hashlib.sha256(k.encode()).digest()
        for form in (k, raw.hex(), base64.urlsafe_b64encode(raw[:16]).rstrip(b"=").decode()):
            assert form not in text
    assert "sk-" not in text and "sha256" not in text


# Hot reload -----------------------------------------------------------------------------------
async def _client_quota(http: aiohttp.ClientSession, sc: RunningSidecar, client: str) -> list[int]:
    """Statuses of requests from a fresh client (via X-Forwarded-For) until its first 429."""
    statuses = []
    for _ in range(50):
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": client})
        statuses.append(r.status)
        if r.status == 429:
            break
    return statuses


async def test_hot_reload_applies_a_new_limit(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 3, "period": "1m"}], identify=TRUST_LOCAL))
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 3 + [429]
    sc.write_policy(policy_doc(tiers=[{"name": "free", "requests": 7, "period": "1m"}], identify=TRUST_LOCAL))

    async def reloaded() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.250"})
        return check_ratelimit_headers(r.headers)["free"]["q"] == 7

    await wait_for(reloaded, timeout=10, interval=0.1, what="the new limit to apply")
    assert await _client_quota(http, sc, "198.51.100.2") == [200] * 7 + [429]
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_config_reloads_total", result="ok") == 2


async def test_buckets_reset_only_when_their_limit_changes(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    """A config change keeps every bucket, except the buckets whose limit changed: those start
    full under the new limit (nothing used or refused under the old one carries over)."""
    tiers = [{"name": "free", "requests": 3, "period": "1m"}]
    sc = await sidecars(policy_doc(tiers=tiers, identify=TRUST_LOCAL))
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 3 + [429]
    # Same limit, other changes (header style, a new rule): the used-up bucket stays used up.
    sc.write_policy(policy_doc(tiers=tiers, identify=TRUST_LOCAL, headers="both",
                               rules=[{"name": "other", "match": {"path": {"prefix": "/other"}}, "cost": 2}]))

    async def legacy_headers() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.250"})
        return "X-RateLimit-Limit" in r.headers

    await wait_for(legacy_headers, timeout=10, interval=0.1, what="the header change to apply")
    assert await _client_quota(http, sc, "198.51.100.1") == [429]
    # The tier's limit changes: a full bucket of the new size, for this client too.
    sc.write_policy(policy_doc(tiers=[{"name": "free", "requests": 5, "period": "1m"}], identify=TRUST_LOCAL))

    async def reloaded() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.251"})
        return check_ratelimit_headers(r.headers)["free"]["q"] == 5

    await wait_for(reloaded, timeout=10, interval=0.1, what="the new limit to apply")
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 5 + [429]


async def test_invalid_policy_keeps_the_last_good_one(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    good = policy_doc(tiers=[{"name": "free", "requests": 3, "period": "1m"}], identify=TRUST_LOCAL)
    sc = await sidecars(good)
    version = (await call(http, "GET", sc.admin_url + "/admin/config")).json()["config"]["version"]
    broken: list[Any] = [policy_doc(tiers=[{"name": "free", "requests": -1, "period": "1m"}]),
              "apiVersion: [unclosed\n  ::: not yaml"]
    for n, bad in enumerate(broken, start=1):
        sc.write_policy(bad)

        async def counted(n: int = n) -> bool:
            text = await metrics_text(http, sc)
            return metric(text, "sluice_config_reloads_total", result="invalid") >= n

        await wait_for(counted, timeout=10, interval=0.1, what="the invalid reload to be counted")
        assert await _client_quota(http, sc, f"198.51.100.{n}") == [200] * 3 + [429]
        assert (await call(http, "GET", sc.admin_url + "/readyz")).status == 200
        cfg = (await call(http, "GET", sc.admin_url + "/admin/config")).json()
        assert cfg["config"]["version"] == version
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_config_reloads_total", result="invalid") == 2
    assert metric(text, "sluice_config_reloads_total", result="ok") == 1
