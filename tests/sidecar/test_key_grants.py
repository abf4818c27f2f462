"""API keys resolved from their Redis grants (``sluice_core.grants``), by real sidecar processes
in cluster mode, on a single Redis, behind Sentinel and on a 3-master Cluster: a key created, changed (tier, own
limit) or revoked in Redis takes effect through its change notice, expiry holds to the second, a
grant naming a tier the policy lacks is an unknown key, an unknown key writes nothing to Redis,
the grant cache stays within its size, and a notice missed while the subscription was down leaves
no stale grant behind. The config document embeds no ``apiKeys`` here: that is what makes the
sidecar resolve keys from Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sluice_core import configstore, keyschema
from sluice_core.model import CompiledPolicy, Limit
from support.grant_store import key_policy, now_ms, publish_policies, put_key, raw_key, revoke_key
from support.key_sidecar import DEADLINE, all_keys, call, start, status
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisClusterProcs, RedisServer, sentinel_for
from support.store_calls import store_call


@dataclass
class ViaSentinel:
    """A Redis reached through a Sentinel: ``url`` names the Sentinel, the nodes are the master."""

    master: RedisServer
    url: str

    def __iter__(self) -> Iterator[RedisServer]:
        yield self.master


Server = RedisServer | RedisClusterProcs | ViaSentinel


@pytest.fixture(params=["single", "sentinel", "cluster"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    if request.param != "sentinel":
        yield request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")
        return
    master = RedisServer()
    try:
        with sentinel_for(master) as port:
            yield ViaSentinel(master, f"redis+sentinel://127.0.0.1:{port}/sluicemaster")
    finally:
        master.close()


def nodes(server: Server) -> list[RedisServer]:
    return [server] if isinstance(server, RedisServer) else list(server)


def published(url: str, **options: Any) -> tuple[str, CompiledPolicy]:
    """A new namespace whose config document holds one :func:`key_policy` (with ``options``)
    and no embedded keys, written to Redis: its keys are resolved from grants."""
    ns = "kg-" + uuid.uuid4().hex[:8]
    policy = key_policy(ns, **options)
    publish_policies(url, ns, policy)
    return ns, policy


def test_key_created_changed_and_revoked_take_effect(server: Server,
                                                     upstream_process: UpstreamProcess, labels: Path) -> None:
    ns, policy = published(server.url, required=True)
    key = "key-" + uuid.uuid4().hex
    sidecar = start(upstream_process, server.url, ns, labels)
    try:
        assert status(sidecar, key) == 401  # unknown (and now cached as unknown)
        put_key(server.url, policy.ref, key, "pro")  # its notice drops the negative entry
        wait_until(lambda: status(sidecar, key) == 200, DEADLINE, what="created key accepted")
        assert '"pro";q=1000' in call(sidecar, key)[1]["RateLimit-Policy"]

        # An own limit: a bucket of its own (a new key in Redis), exact from its first request.
        put_key(server.url, policy.ref, key, "pro", limit=Limit(2, 3_600_000_000, 2))
        wait_until(lambda: '"pro";q=2' in call(sidecar, key)[1].get("RateLimit-Policy", ""), DEADLINE,
                   what="own limit in force")  # that request took the first of its 2 tokens
        assert [status(sidecar, key) for _ in range(2)] == [200, 429]

        revoke_key(server.url, policy.ref, key)
        wait_until(lambda: status(sidecar, key) == 401, DEADLINE, what="revoked key refused")
    finally:
        sidecar.close()


def test_expiry_holds_to_the_second(server: Server, upstream_process: UpstreamProcess,
                                    labels: Path) -> None:
    ns, policy = published(server.url, required=True)
    key = "key-" + uuid.uuid4().hex
    sidecar = start(upstream_process, server.url, ns, labels)
    try:
        for room_ms in (3_000, 15_000, 60_000):  # a slow machine gets a longer expiry, not a flake
            expires = now_ms() + room_ms
            put_key(server.url, policy.ref, key, "pro", expires_ms=expires)
            first = status(sidecar, key)
            if now_ms() < expires:  # answered before the expiry: it must have been good
                break
        assert first == 200  # cached now, with its expiry
        wait_until(lambda: now_ms() >= expires, 5, interval=0.005, what="the expiry")
        # No notice announces an expiry: the cached grant must not outlive it.
        assert status(sidecar, key) == 401
    finally:
        sidecar.close()


@pytest.mark.parametrize("required", [True, False])
def test_grant_of_a_tier_the_policy_lacks_is_an_unknown_key(
        server: Server, upstream_process: UpstreamProcess, labels: Path,
        required: bool) -> None:
    ns, policy = published(server.url, required=required)
    key, good = "key-" + uuid.uuid4().hex, "good-" + uuid.uuid4().hex
    put_key(server.url, policy.ref, key, "gold")
    put_key(server.url, policy.ref, good, "pro")
    sidecar = start(upstream_process, server.url, ns, labels)
    try:
        assert '"pro";q=1000' in call(sidecar, good)[1]["RateLimit-Policy"]  # a tier it has
        got, headers = call(sidecar, key)
        if required:
            assert got == 401
        else:  # anonymous: the default tier
            assert got == 200 and '"free";q=3' in headers["RateLimit-Policy"]
    finally:
        sidecar.close()


def test_unknown_keys_write_nothing_and_fall_back_to_the_anonymous_client(
        server: Server, upstream_process: UpstreamProcess, labels: Path) -> None:
    ns, policy = published(server.url, required=False, free=5)
    sidecar = start(upstream_process, server.url, ns, labels)
    try:
        before = all_keys(server)
        got = [status(sidecar, "random-" + uuid.uuid4().hex) for _ in range(8)]
        created = all_keys(server) - before
    finally:
        sidecar.close()
    # One shared anonymous bucket (this client's address), default tier: 5 then refused.
    assert got == [200] * 5 + [429] * 3
    anonymous = keyschema.client_tag(policy.ref, keyschema.client_for_ip("127.0.0.1"))
    assert created and all(k.decode().startswith(anonymous + ":t:free:") for k in created), created


def test_grant_cache_stays_within_its_size(server: Server,
                                           upstream_process: UpstreamProcess, labels: Path) -> None:
    ns, policy = published(server.url, required=True)
    keys = [f"key-{i}-{uuid.uuid4().hex}" for i in range(60)]
    for key in keys:
        put_key(server.url, policy.ref, key, "pro")
    sidecar = start(upstream_process, server.url, ns, labels, "--grant-cache-size", "20")
    try:
        assert [status(sidecar, k) for k in keys] == [200] * 60
        assert [status(sidecar, "nope-" + uuid.uuid4().hex) for _ in range(60)] == [401] * 60
        summary = _config(sidecar)["apiKeys"]
        assert summary == {"source": "redis", "cached": 40}  # 20 known + 20 unknown
        # The first key was dropped long ago: resolved again, and still good.
        resolved = sidecar.metric("sluice_grant_resolves_total", result="known")
        assert status(sidecar, keys[0]) == 200
        assert sidecar.metric("sluice_grant_resolves_total", result="known") == resolved + 1
        # The last one is cached: no resolve.
        assert status(sidecar, keys[-1]) == 200
        assert sidecar.metric("sluice_grant_resolves_total", result="known") == resolved + 1
    finally:
        sidecar.close()


def test_notice_missed_while_unsubscribed_leaves_no_stale_grant(
        server: Server, upstream_process: UpstreamProcess, labels: Path) -> None:
    ns, policy = published(server.url, required=True)
    key = "key-" + uuid.uuid4().hex
    put_key(server.url, policy.ref, key, "pro")
    # Cached for an hour: only the resubscription can make the sidecar forget it.
    sidecar = start(upstream_process, server.url, ns, labels, "--grant-cache-max-age-s", "3600")
    try:
        assert status(sidecar, key) == 200  # cached
        # Revoked without a notice: as if it was published while the sidecar was not listening.
        grant = keyschema.grant_key(keyschema.policy_id(policy.ref), keyschema.client_for_api_key(raw_key(key)))
        assert store_call(server.url, _delete, grant) == 1
        assert status(sidecar, key) == 200  # the cache still holds it: the notice was missed
        # Drop the sidecar's subscription; once it is back, it forgets what it cached.
        for node in nodes(server):
            with node.client() as r:
                r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        wait_until(lambda: status(sidecar, key) == 401, DEADLINE, what="stale grant forgotten")
    finally:
        sidecar.close()


def test_a_reload_that_keeps_the_policy_keeps_its_grant_cache(
        redis_server: RedisServer, upstream_process: UpstreamProcess, labels: Path) -> None:
    """A new config version that changes nothing of the policy's ref, tiers and key source (here:
    a rule added) keeps the cached grants: no key is resolved again."""
    ns, policy = published(redis_server.url, required=True)
    key = "key-" + uuid.uuid4().hex
    put_key(redis_server.url, policy.ref, key, "pro")
    sidecar = start(upstream_process, redis_server.url, ns, labels, "--grant-cache-max-age-s", "3600")
    try:
        assert [status(sidecar, key) for _ in range(2)] == [200, 200]
        assert sidecar.metric("sluice_grant_resolves_total", result="known") == 1
        ruled = key_policy(ns, required=True, rule={"name": "health", "match": {"path": {"prefix": "/healthz"}},
                                                  "skip": True})
        version = publish_policies(redis_server.url, ns, ruled)
        wait_until(lambda: sidecar.metric("sluice_config_version", namespace=ns) == version, DEADLINE,
                   what="the new config loaded")
        assert status(sidecar, key) == 200
        assert sidecar.metric("sluice_grant_resolves_total", result="known") == 1
    finally:
        sidecar.close()


def _revoke_silently(server: Server, policy_ref: str, key: str) -> None:
    """Delete a key's grant and announce nothing: a notice lost on the way."""
    grant = keyschema.grant_key(keyschema.policy_id(policy_ref), keyschema.client_for_api_key(raw_key(key)))
    assert store_call(server.url, _delete, grant) == 1


@pytest.mark.parametrize("required", [True, False])
def test_revocation_whose_notice_is_lost_lands_within_the_max_age(
        server: Server, upstream_process: UpstreamProcess, labels: Path, required: bool) -> None:
    ns, policy = published(server.url, required=required)
    key = "key-" + uuid.uuid4().hex
    put_key(server.url, policy.ref, key, "pro")
    sidecar = start(upstream_process, server.url, ns, labels)  # the default max age: 1 s
    try:
        assert '"pro"' in call(sidecar, key)[1]["RateLimit-Policy"]  # cached
        _revoke_silently(server, policy.ref, key)
        # The subscription is fine; only the max age can end the cached grant.
        if required:
            wait_until(lambda: status(sidecar, key) == 401, DEADLINE, what="revoked key refused")
        else:
            wait_until(lambda: '"pro"' not in call(sidecar, key)[1].get("RateLimit-Policy", ""),
                       DEADLINE, what="revoked key on the anonymous fallback")
    finally:
        sidecar.close()


def test_a_silent_subscription_is_dropped_and_the_cache_with_it(
        server: Server, upstream_process: UpstreamProcess, labels: Path) -> None:
    """A subscription that stops answering (here: Redis paused) counts as lost once its PING
    goes unanswered: the sidecar subscribes again and forgets what it cached."""
    ns, policy = published(server.url, required=True)
    key = "key-" + uuid.uuid4().hex
    put_key(server.url, policy.ref, key, "pro")
    sidecar = start(upstream_process, server.url, ns, labels, "--grant-cache-max-age-s", "3600")
    try:
        assert status(sidecar, key) == 200  # cached for an hour
        _revoke_silently(server, policy.ref, key)
        for node in nodes(server):  # nothing answers for 3 s; no connection is closed
            with node.client() as r:
                r.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        wait_until(lambda: status(sidecar, key) == 401, DEADLINE, what="stale grant forgotten")
    finally:
        sidecar.close()


async def _delete(client: configstore.Client, key: str) -> int:
    return int(await client.redis.delete(key))


def _config(sidecar: SidecarProcess) -> dict[str, object]:
    code, body = http_get(sidecar.admin + "/admin/config")
    assert code == 200
    result: dict[str, object] = json.loads(body)
    return result

