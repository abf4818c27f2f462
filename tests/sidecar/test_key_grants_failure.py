"""Keys resolved from Redis grants while Redis does not answer (a real sidecar process, a paused
redis-server), under the default failure mode (open): a key the grant cache knows is forwarded
as any decision is then; a key it does not know cannot be checked, so where keys are required it
is answered 503 (never forwarded unchecked: a flood that slows Redis down must not get random
keys past the requirement), and where they are not it is forwarded like the anonymous client."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.grant_store import key_policy, publish_policies, put_key
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def status(sidecar: SidecarProcess, key: str) -> int:
    req = urllib.request.Request(sidecar.url + "/api", headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_unresolvable_keys_while_redis_is_away(fresh_redis: RedisServer, upstream: UpstreamProcess,
                                               tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    known = "known-" + uuid.uuid4().hex
    sidecars: dict[bool, SidecarProcess] = {}
    try:
        for required in (True, False):
            ns = f"kf-{required}-{uuid.uuid4().hex[:6]}".lower()
            policy = key_policy(ns, required=required)
            assert policy.failure_mode.value == "open"
            publish_policies(fresh_redis.url, ns, policy)
            put_key(fresh_redis.url, policy.ref, known, "pro")
            sidecars[required] = SidecarProcess(
                upstream.url, "--redis", fresh_redis.url, "--namespace", ns, "--pod-labels", str(labels),
                "--poll-interval-s", "60", "--redis-timeout-ms", "100")
            assert status(sidecars[required], known) == 200  # cached
        fresh_redis.pause()
        try:
            required, optional = sidecars[True], sidecars[False]
            assert status(required, known) == 200  # cached: failure mode open
            assert [status(required, "random-" + uuid.uuid4().hex) for _ in range(8)] == [503] * 8
            assert status(optional, "random-" + uuid.uuid4().hex) == 200  # as the anonymous client
        finally:
            fresh_redis.resume()
    finally:
        for s in sidecars.values():
            s.close()
