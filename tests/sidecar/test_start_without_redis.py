"""A cluster-mode sidecar that starts while Redis is down has no config, so it cannot know its
policy's failure mode; the injector decides for it at admission (``--without-config``, see
sluice_operator.injection.failmode) and readiness follows (#12, defect 2):

- ``unlimited`` (no policy selects the pod, or all that do fail open): Ready at once, every
  request forwarded and counted ``unconfigured``; enforcement starts when Redis and its config
  are there;
- ``refuse`` (a fail-closed policy selects it): not Ready, 503, until its config is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisServer, pick_port


def policy_yaml(ns: str, failure_mode: str) -> str:
    return (f"apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: api, namespace: {ns}}}\n"
            f"spec:\n  failureMode: {failure_mode}\n  selector: {{matchLabels: {{app: web}}}}\n"
            "  tiers: [{name: free, requests: 2, period: 1h}]\n")


def apply(tmp_path: Path, url: str, text: str) -> None:
    f = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "sluice_core.cli", "apply", "-f", str(f), "--redis", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def statuses(url: str, n: int) -> list[int]:
    return [http_get(url + "/api")[0] for _ in range(n)]


def loaded_and_closed(sidecar: SidecarProcess) -> bool:
    state = json.loads(http_get(sidecar.admin + "/readyz")[1])
    return bool(state["config"]["loaded"]) and state["store"]["circuit"] == "closed"


def sidecar_without_redis(upstream: UpstreamProcess, labels: Path, port: int, ns: str,
                          without_config: str) -> SidecarProcess:
    sidecar = SidecarProcess(upstream.url, "--redis", f"redis://127.0.0.1:{port}", "--namespace", ns,
                             "--pod-labels", str(labels), "--pod-name", "web-1", "--poll-interval-s", "0.2",
                             "--without-config", without_config, "--redis-timeout-ms", "2000", wait_ready=False)
    wait_until(lambda: http_get(sidecar.admin + "/healthz")[0] == 200, 20, what="sidecar up")
    return sidecar


def test_fail_open_pod_is_ready_and_forwards_while_redis_is_down(
        upstream_process: UpstreamProcess, labels: Path, tmp_path: Path) -> None:
    port, ns = pick_port(), "down-" + uuid.uuid4().hex[:8]
    sidecar = sidecar_without_redis(upstream_process, labels, port, ns, "unlimited")
    try:
        sidecar.wait_ready()  # Redis is not there: ready all the same
        assert statuses(sidecar.url, 3) == [200, 200, 200]
        assert sidecar.metric("sluice_decisions_total", decision="unconfigured") == 3
        with RedisServer(port=port) as redis:  # Redis comes (back): the policy is enforced
            apply(tmp_path, redis.url, policy_yaml(ns, "open"))
            wait_until(lambda: loaded_and_closed(sidecar), 20, what="config loaded, circuit closed")
            assert statuses(sidecar.url, 3) == [200, 200, 429]
            assert http_get(sidecar.admin + "/readyz")[0] == 200
    finally:
        sidecar.close()


def test_fail_closed_pod_waits_for_its_config(upstream_process: UpstreamProcess, labels: Path,
                                              tmp_path: Path) -> None:
    port, ns = pick_port(), "closed-" + uuid.uuid4().hex[:8]
    sidecar = sidecar_without_redis(upstream_process, labels, port, ns, "refuse")
    try:
        assert http_get(sidecar.admin + "/readyz")[0] == 503
        assert statuses(sidecar.url, 2) == [503, 503]
        with RedisServer(port=port) as redis:
            apply(tmp_path, redis.url, policy_yaml(ns, "closed"))
            sidecar.wait_ready()
            wait_until(lambda: loaded_and_closed(sidecar), 20, what="circuit closed")
            assert statuses(sidecar.url, 3) == [200, 200, 429]
    finally:
        sidecar.close()
