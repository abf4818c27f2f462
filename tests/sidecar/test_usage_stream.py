"""Usage analytics end to end (#10 §1): real sidecar processes count their decisions and write
one stream entry per window to a real Redis (single, and the 3-master Cluster), which is read
back with XRANGE and ``sluice_core.usage.decode``: the rows are exactly the requests made;
API keys appear by their id, never themselves; the partial window goes out on SIGTERM; a
window Redis did not take arrives once when it is back (same source and sequence), or is
counted dropped after its retries."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from sluice_core import keyschema
from support.grant_store import key_policy, publish_policies, put_key
from support.key_sidecar import call, start
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisClusterProcs, RedisServer
from support.usage_stream import raw_entries, requests_by_key, totals, usage_of, windows

DEADLINE = 20.0
ALICE, BOB = "sk-alice-" + "s3cret" * 4, "sk-bob-" + "s3cret" * 4


def _policy(ns: str, extra: str = "") -> str:
    return f"""apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: shop, namespace: {ns}}}
spec:
  identify: {{order: [apiKey, ip]}}
  apiKeys: {{header: X-API-Key, required: false}}
  tiers:
    - {{name: free, requests: 3, period: 1h}}
    - {{name: pro, requests: 1000, period: 1h}}
  defaultTier: free
  rules:
    - {{name: health, match: {{path: {{prefix: /healthz}}}}, skip: true}}
    - {{name: orders, match: {{path: {{prefix: /orders}}}}, cost: 2}}
{extra}"""


def _files(tmp_path: Path, ns: str) -> list[str]:
    policy, keys = tmp_path / "policy.yaml", tmp_path / "keys.yaml"
    policy.write_text(_policy(ns))
    keys.write_text(f'keys:\n  "{ALICE}": {{tier: pro, id: alice}}\n  "{BOB}": pro\n')
    return ["--policy-file", str(policy), "--api-keys-file", str(keys)]


def send(sidecar: SidecarProcess, path: str, *, key: str | None = None, body: bytes | None = None) -> int:
    req = urllib.request.Request(sidecar.url + path, data=body, method="POST" if body else "GET",
                                 headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _known_mix(sidecar: SidecarProcess) -> list[int]:
    codes = [send(sidecar, "/users/42/profile"), send(sidecar, "/users/42/profile"),
             send(sidecar, "/users/550e8400-e29b-41d4-a716-446655440000", body=b"hello"),
             send(sidecar, "/users/42"), send(sidecar, "/users/42"),
             send(sidecar, "/orders/9", key=ALICE), send(sidecar, "/orders/9", key=ALICE),
             send(sidecar, "/orders/9", key=BOB), send(sidecar, "/healthz")]
    return codes


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> RedisServer | RedisClusterProcs:
    found: RedisServer | RedisClusterProcs = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster")
    return found


def test_a_known_mix_gives_exactly_its_rows_and_sigterm_sends_the_partial_window(upstream_process: UpstreamProcess,
        store: RedisServer | RedisClusterProcs, tmp_path: Path) -> None:
    ns = "usage-" + uuid.uuid4().hex[:8]
    # An hour's window: only SIGTERM ends it (should the hour turn meanwhile, two windows: summed).
    sidecar = SidecarProcess(upstream_process.url, *_files(tmp_path, ns), "--redis", store.url,
                             "--usage-window-s", "3600",
                             "--redis-timeout-ms", "2000")
    try:
        source = usage_of(sidecar)["source"]
        assert _known_mix(sidecar) == [200, 200, 200, 429, 429, 200, 200, 200, 200]
        assert not windows(store, source)  # nothing yet: the window is open
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()
    got = windows(store, source)
    assert [w.seq for w in got] in ([0], [0, 1]) and all(w.namespace == ns for w in got)
    ref = f"{ns}/shop"
    bob = "key:sha256:" + hashlib.sha256(BOB.encode()).hexdigest()[:16]
    assert requests_by_key(got) == {
        (ref, "ip:127.0.0.1", "free", "/users/:id", "allowed", "2xx"): 3,
        (ref, "ip:127.0.0.1", "free", "/users/:id", "limited", "none"): 2,
        (ref, "key:alice", "pro", "orders", "allowed", "2xx"): 2,
        (ref, bob, "pro", "orders", "allowed", "2xx"): 1,
        ("", "anonymous", "", "health", "skipped", "2xx"): 1,
    }
    t = totals(got)
    allowed = t[(ref, "ip:127.0.0.1", "free", "/users/:id", "allowed", "2xx")]
    assert (allowed["tokens"], allowed["bytes_in"], allowed["bytes_out"]) == (3, 5, 3 * len(b"ok"))
    assert allowed["latency_count"] == allowed["histogram"] == 3
    limited = t[(ref, "ip:127.0.0.1", "free", "/users/:id", "limited", "none")]
    assert (limited["tokens"], limited["latency_count"], limited["bytes_out"]) == (0, 0, 0)
    assert t[(ref, "key:alice", "pro", "orders", "allowed", "2xx")]["tokens"] == 4  # cost 2
    raw = b"".join(f[b"w"] for _, f in raw_entries(store))
    assert ALICE.encode() not in raw and BOB.encode() not in raw
    assert hashlib.sha256(ALICE.encode()).hexdigest().encode() not in raw


def test_usage_off_writes_nothing(upstream_process: UpstreamProcess, redis_server: RedisServer, tmp_path: Path) -> None:
    ns = "usage-off-" + uuid.uuid4().hex[:8]
    sidecar = SidecarProcess(upstream_process.url, *_files(tmp_path, ns), "--redis", redis_server.url, "--usage", "off")
    try:
        assert http_get(sidecar.admin + "/usage")[0] == 404
        assert send(sidecar, "/users/1") == 200
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()
    assert not [f for _, f in raw_entries(redis_server) if ns.encode() in f[b"w"]]


def test_a_key_resolved_from_its_redis_grant_is_reported_by_its_id(
        store: RedisServer | RedisClusterProcs, upstream_process: UpstreamProcess, labels: Path) -> None:
    """Cluster mode, keys in Redis grants: the resolve decision's grant carries the key's id,
    and the grant cache keeps it for the requests that follow."""
    ns = "usage-k-" + uuid.uuid4().hex[:8]
    policy = key_policy(ns, required=True)
    publish_policies(store.url, ns, policy)
    key = "sk-" + uuid.uuid4().hex
    put_key(store.url, policy.ref, key, "pro", key_id="acme-prod")
    sidecar = start(upstream_process, store.url, ns, labels, "--usage-window-s", "3600",
                    "--grant-cache-max-age-s", "3600")
    try:
        source = usage_of(sidecar)["source"]
        assert [call(sidecar, key)[0] for _ in range(3)] + [call(sidecar, None)[0]] == [200, 200, 200, 401]
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()
    got = requests_by_key(windows(store, source))
    assert got == {(policy.ref, "key:acme-prod", "pro", "/api", "allowed", "2xx"): 3,
                   (policy.ref, "anonymous", "", "/api", "unauthorized", "none"): 1}
    raw = b"".join(f[b"w"] for _, f in raw_entries(store))
    assert key.encode() not in raw and keyschema.client_for_api_key(
        hashlib.sha256(key.encode()).digest()).encode() not in raw


def _usage_metric(sidecar: SidecarProcess, name: str) -> float:
    return sidecar.metric(name)


def _flushed(sidecar: SidecarProcess) -> dict[str, Any] | None:
    """/usage once nothing is pending and the window being counted is empty (all flushed)."""
    u = usage_of(sidecar)
    return u if u["pending"] == 0 and not u["current"]["rows"] else None


def test_redis_down_during_a_flush_then_back_the_window_arrives_once(upstream_process: UpstreamProcess,
                                                                    fresh_redis: RedisServer,
                                                                    tmp_path: Path) -> None:
    sidecar = SidecarProcess(upstream_process.url, *_files(tmp_path, "usage-down"), "--redis", fresh_redis.url,
                             "--usage-window-s", "1", "--usage-retries", "60", "--redis-timeout-ms", "2000")
    try:
        source = usage_of(sidecar)["source"]
        assert send(sidecar, "/users/1") == 200
        wait_until(lambda: _flushed(sidecar) and windows(fresh_redis, source), DEADLINE, what="first window")
        fresh_redis.stop()
        sent = [send(sidecar, f"/items/{i}") for i in range(5)]  # Redis away: the policy fails open
        assert sent == [200] * 5
        wait_until(lambda: _usage_metric(sidecar, "sluice_usage_errors_total") >= 2, DEADLINE,
                   what="two failed window writes")
        assert usage_of(sidecar)["pending"] >= 1
        fresh_redis.start()  # empty: what arrives now is what was pending
        wait_until(lambda: _flushed(sidecar), DEADLINE, what="pending windows written")
        assert _usage_metric(sidecar, "sluice_usage_dropped_windows_total") == 0
    finally:
        sidecar.close()
    got = windows(fresh_redis, source)
    seqs = [w.seq for w in got]
    assert len(seqs) == len(set(seqs)) >= 1  # each window once
    assert requests_by_key(got) == {("usage-down/shop", "ip:127.0.0.1", "free", "/items/:id", "failed_open", "2xx"): 5}


def test_a_window_redis_does_not_take_within_its_retries_is_dropped_and_counted(upstream_process: UpstreamProcess,
        fresh_redis: RedisServer, tmp_path: Path) -> None:
    sidecar = SidecarProcess(upstream_process.url, *_files(tmp_path, "usage-drop"), "--redis", fresh_redis.url,
                             "--usage-window-s", "1", "--usage-retries", "1", "--redis-timeout-ms", "2000")
    try:
        source = usage_of(sidecar)["source"]
        fresh_redis.stop()
        first = usage_of(sidecar)["current"]["seq"]
        assert send(sidecar, "/items/1") == 200
        wait_until(lambda: _usage_metric(sidecar, "sluice_usage_dropped_windows_total") >= 1, DEADLINE,
                   what="a window dropped")
        assert send(sidecar, "/items/2") == 200
        fresh_redis.start()
        done = wait_until(lambda: _flushed(sidecar), DEADLINE, what="pending windows written or dropped")
        dropped = _usage_metric(sidecar, "sluice_usage_dropped_windows_total")
    finally:
        sidecar.close()
    seqs = [w.seq for w in windows(fresh_redis, source)]
    assert len(seqs) == len(set(seqs))
    # Every window taken since Redis went away was either written (once) or counted dropped.
    assert len(seqs) + dropped == done["current"]["seq"] - first


def test_many_clients_fold_beyond_the_bounds_with_exact_counts(upstream_process: UpstreamProcess,
                                                               redis_server: RedisServer, tmp_path: Path) -> None:
    """Identity-header clients (believed from loopback), more than --usage-max-clients, over
    more paths than --usage-max-endpoints: the entry holds the bounds, the folded counts are
    exact, and no request is lost."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("""apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: many, namespace: usage-many}
spec:
  identify: {order: [header, ip], header: X-Client, headerFrom: trustedProxiesOrLoopback}
  tiers: [{name: free, requests: 100, period: 1h}]
""")
    sidecar = SidecarProcess(upstream_process.url, "--policy-file", str(policy), "--redis", redis_server.url,
                             "--usage-window-s", "3600", "--usage-max-clients", "10", "--usage-max-endpoints", "4")
    n = 60
    try:
        source = usage_of(sidecar)["source"]
        for i in range(n):
            req = urllib.request.Request(f"{sidecar.url}/p{i % 8}/x", headers={"X-Client": f"client-{i}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()
    got = windows(redis_server, source)
    assert sum(r.requests for w in got for r in w.rows) == n
    if len(got) == 1:  # (an hour boundary would split the bounds across two windows)
        w = got[0]
        clients = {r.client for r in w.rows}
        endpoints = {r.endpoint for r in w.rows}
        assert len(clients - {"(other)"}) == 10 and len(endpoints - {"(other)"}) == 4
        assert w.folded_clients == n - 10
        assert w.folded_endpoints == sum(1 for i in range(n) if i % 8 >= 4)
        assert all(c.startswith("header:") and len(c) == 7 + 16 for c in clients - {"(other)"})
