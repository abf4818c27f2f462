"""Keys resolved from Redis grants while Redis does not answer (a real sidecar process, a paused
redis-server), under the default failure mode (open): a key the grant cache knows is forwarded
as any decision is then; a key it does not know cannot be checked, so where keys are required it
is answered 503 (never forwarded unchecked: a flood that slows Redis down must not get random
keys past the requirement), and where they are not it is forwarded like the anonymous client."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.grant_store import key_policy, publish_policies, put_key
from support.key_sidecar import start, status
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer


def test_unresolvable_keys_while_redis_is_away(fresh_redis: RedisServer, upstream_process: UpstreamProcess,
                                               labels: Path) -> None:
    known = "known-" + uuid.uuid4().hex
    sidecars: dict[bool, SidecarProcess] = {}
    try:
        for required in (True, False):
            ns = f"kf-{required}-{uuid.uuid4().hex[:6]}".lower()
            policy = key_policy(ns, required=required)
            assert policy.failure_mode.value == "open"
            publish_policies(fresh_redis.url, ns, policy)
            put_key(fresh_redis.url, policy.ref, known, "pro")
            sidecars[required] = start(upstream_process, fresh_redis.url, ns, labels, "--redis-timeout-ms", "100")
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


def _body(sidecar: SidecarProcess, key: str) -> tuple[int, str]:
    req = urllib.request.Request(sidecar.url + "/api", headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def test_resolves_beyond_the_cap_are_answered_without_redis(
        fresh_redis: RedisServer, upstream_process: UpstreamProcess, labels: Path) -> None:
    """--max-key-resolves 1: while one random key's resolve hangs (Redis paused), another
    required key is answered at once, without Redis: 503."""
    ns = f"kc-{uuid.uuid4().hex[:6]}"
    policy = key_policy(ns, required=True)
    publish_policies(fresh_redis.url, ns, policy)
    sidecar = start(upstream_process, fresh_redis.url, ns, labels, "--redis-timeout-ms", "5000",
                    "--max-key-resolves", "1")
    try:
        assert status(sidecar, "warm-" + uuid.uuid4().hex) == 401
        fresh_redis.pause()
        try:
            with ThreadPoolExecutor(1) as pool:
                hanging = pool.submit(status, sidecar, "random-" + uuid.uuid4().hex)
                wait_until(lambda: sidecar.metric("sluice_inflight_requests") == 1, 5,
                           what="the first resolve in flight")
                code, body = _body(sidecar, "random-" + uuid.uuid4().hex)
                assert code == 503 and "too many API keys" in body
                assert not hanging.done()  # answered while the first still waits for Redis
                fresh_redis.resume()
                assert hanging.result(timeout=10) == 401
        finally:
            fresh_redis.resume()
    finally:
        sidecar.close()
