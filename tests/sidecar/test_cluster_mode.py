"""Cluster mode across processes: `sluice apply` writes what the operator will write, and a real
sidecar process reading its namespace's config from Redis enforces it, reloads it on a change
notice (pub/sub) or by polling, and keeps the last good config when the config or Redis breaks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sluice_core import configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.store_calls import store_call


def policy_yaml(ns: str, *, requests: int = 3, mode: str = "enforce", app: str = "web") -> str:
    return f"""
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: api, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  tiers:
    - {{name: free, requests: {requests}, period: 1h}}
  mode: {mode}
"""


def apply(tmp_path: Path, url: str, text: str) -> str:
    f = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "sluice_core.cli", "apply", "-f", str(f), "--redis", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def statuses(url: str, n: int) -> list[int]:
    return [http_get(url + "/api")[0] for _ in range(n)]


def config_version(sidecar: SidecarProcess) -> int:
    return int(json.loads(http_get(sidecar.admin + "/admin/config")[1])["config"]["version"])


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_apply_enforce_and_reload_on_change_notice(request: pytest.FixtureRequest, topology: str,
                                                   upstream_process: UpstreamProcess, labels: Path,
                                                   tmp_path: Path) -> None:
    server = request.getfixturevalue("redis_server" if topology == "single" else "redis_cluster")
    ns = "cm-" + uuid.uuid4().hex[:8]
    out = apply(tmp_path, server.url, policy_yaml(ns))
    assert f"applied: namespace {ns}: api (config version 1)" in out
    # Polling is slowed to 60 s: only the change notice can make the reload below happen in time.
    sidecar = SidecarProcess(upstream_process.url, "--redis", server.url, "--namespace", ns,
                             "--pod-labels", str(labels), "--poll-interval-s", "60")
    try:
        assert statuses(sidecar.url, 4) == [200, 200, 200, 429]
        started = time.monotonic()
        apply(tmp_path, server.url, policy_yaml(ns, mode="shadow"))
        wait_until(lambda: config_version(sidecar) == 2, 10, what="reload after change notice")
        reload_s = time.monotonic() - started
        assert statuses(sidecar.url, 3) == [200, 200, 200]  # shadow: over the limit, not refused
        assert sidecar.metric("sluice_decisions_total", decision="shadow_limited") == 3
        print(f"reload after apply took {reload_s * 1000:.0f} ms ({topology})")
    finally:
        sidecar.close()


def test_polling_fallback_and_last_good_config(redis_server: object, upstream_process: UpstreamProcess,
                                               labels: Path, tmp_path: Path) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    ns = "pf-" + uuid.uuid4().hex[:8]
    apply(tmp_path, url, policy_yaml(ns, requests=2))
    sidecar = SidecarProcess(upstream_process.url, "--redis", url, "--namespace", ns,
                             "--pod-labels", str(labels), "--poll-interval-s", "0.2")
    try:
        assert statuses(sidecar.url, 3) == [200, 200, 429]
        client = redis_server.client()  # type: ignore[attr-defined]
        key = keyschema.config_key(ns)
        # A broken document with a new version, written without a change notice: the poller
        # finds it, refuses it, and the last good config keeps serving.
        client.hset(key, mapping={"version": 5, "doc": '{"schema": 1, "policies": [{"kind": "nope"}]}'})
        wait_until(lambda: sidecar.metric("sluice_config_reloads_total", result="invalid") >= 1, 10,
                   what="invalid config noticed by polling")
        assert statuses(sidecar.url, 1) == [429]
        assert config_version(sidecar) == 1
        # Config deleted from Redis (e.g. FLUSHALL): still the last good config.
        client.delete(key)
        wait_until(lambda: "is gone from Redis" in sidecar.output(), 10,
                   what="the deletion noticed by polling")
        assert statuses(sidecar.url, 1) == [429]
        # A good config again: applied (its notice arrives too, polling would also find it).
        apply(tmp_path, url, policy_yaml(ns, mode="shadow"))
        wait_until(lambda: json.loads(
            http_get(sidecar.admin + "/admin/config")[1])["policy"]["spec"]["mode"] == "shadow", 10,
            what="good config picked up")
        assert statuses(sidecar.url, 2) == [200, 200]
    finally:
        sidecar.close()


def test_no_matching_policy_means_not_limited(redis_server: object, upstream_process: UpstreamProcess,
                                              labels: Path, tmp_path: Path) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    ns = "nm-" + uuid.uuid4().hex[:8]
    apply(tmp_path, url, policy_yaml(ns, requests=1, app="other"))
    sidecar = SidecarProcess(upstream_process.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels))
    try:
        assert statuses(sidecar.url, 3) == [200, 200, 200]
        assert sidecar.metric("sluice_decisions_total", decision="unconfigured") == 3
    finally:
        sidecar.close()


def cluster_policy_yaml(requests: int) -> str:
    return f"""
apiVersion: sluice.dev/v1alpha1
kind: ClusterRateLimitPolicy
metadata: {{name: shared}}
spec:
  tiers: [{{name: free, requests: {requests}, period: 1h}}]
"""


def test_a_namespace_without_a_policy_passes_unlimited_and_is_ready(fresh_redis: object,
                                                                     upstream_process: UpstreamProcess,
                                                                     labels: Path, tmp_path: Path) -> None:
    """A pod injected into a namespace that never had a policy, with no cluster policy either:
    `sluice apply` (of another namespace) left the cluster document, empty, so the sidecar knows
    Redis is initialised and no policy selects the pod: ready, requests pass, `unconfigured`."""
    url = fresh_redis.url  # type: ignore[attr-defined]
    apply(tmp_path, url, policy_yaml("elsewhere"))
    stored = store_call(url, configstore.read, CLUSTER_SCOPE)
    assert stored is not None and stored.policies == () and stored.placeholder
    ns = "np-" + uuid.uuid4().hex[:8]
    sidecar = SidecarProcess(upstream_process.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels))
    try:  # ready: SidecarProcess waited for /readyz 200
        assert statuses(sidecar.url, 3) == [200, 200, 200]
        assert sidecar.metric("sluice_decisions_total", decision="unconfigured") == 3
        assert sidecar.metric("sluice_decisions_total", decision="no_config") == 0
    finally:
        sidecar.close()


def test_with_both_documents_missing_the_sidecar_waits_until_the_cluster_document_appears(
        fresh_redis: object, upstream_process: UpstreamProcess, labels: Path, tmp_path: Path) -> None:
    """Redis holds no config at all (lost, or nothing was ever written): fail safe, 503, until
    the operator or `sluice apply` writes (here: a policy of another namespace), then ready."""
    url = fresh_redis.url  # type: ignore[attr-defined]
    ns = "nd-" + uuid.uuid4().hex[:8]
    sidecar = SidecarProcess(upstream_process.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels),
                             "--poll-interval-s", "0.2", wait_ready=False)
    try:
        wait_until(lambda: http_get(sidecar.admin + "/healthz")[0] == 200, 20, what="sidecar up")
        assert http_get(sidecar.admin + "/readyz")[0] == 503
        assert statuses(sidecar.url, 2) == [503, 503]
        # and says why, once (a pod used to wait here in silence: #12, defect 1)
        assert sidecar.output().count(f"no config yet: Redis holds no document for namespace {ns}") == 1
        apply(tmp_path, url, policy_yaml("elsewhere"))
        sidecar.wait_ready()
        assert statuses(sidecar.url, 2) == [200, 200]
        assert sidecar.metric("sluice_decisions_total", decision="unconfigured") == 2
    finally:
        sidecar.close()


def test_a_placeholder_cluster_document_never_replaces_a_loaded_cluster_policy(
        fresh_redis: object, upstream_process: UpstreamProcess, labels: Path, tmp_path: Path) -> None:
    """Redis lost the cluster document and the empty placeholder was created in its place (by
    an operator replica that serves no cluster policy, or start-up): a sidecar keeps enforcing
    the cluster policy it holds (missing = lost), until a real document replaces it."""
    url = fresh_redis.url  # type: ignore[attr-defined]
    client = fresh_redis.client()  # type: ignore[attr-defined]
    ns = "ph-" + uuid.uuid4().hex[:8]
    f = tmp_path / "crlp.yaml"
    f.write_text(cluster_policy_yaml(2))
    r = subprocess.run([sys.executable, "-m", "sluice_core.cli", "apply", "-f", str(f), "--redis", url,
                        "--cluster-namespaces", ns], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sidecar = SidecarProcess(upstream_process.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels),
                             "--poll-interval-s", "0.2")
    try:
        assert statuses(sidecar.url, 3) == [200, 200, 429]
        client.delete(keyschema.config_key(CLUSTER_SCOPE))
        version = store_call(url, configstore.ensure, CLUSTER_SCOPE, min_version=10)
        assert version == 10
        wait_until(lambda: "is a placeholder; keeping the last good one" in sidecar.output(), 10,
                   what="placeholder noticed")
        assert statuses(sidecar.url, 1) == [429]
        assert store_call(url, configstore.ensure, CLUSTER_SCOPE) == 0  # never over a document
    finally:
        sidecar.close()
