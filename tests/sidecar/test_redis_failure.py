"""Redis trouble while serving: killed, stalled, restarted. The sidecar answers within a bounded
time, fails open or closed as the policy says, counts it, and recovers without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get


def policy(tmp_path: Path, failure_mode: str) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text(f"""
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: api}}
spec:
  tiers: [{{name: free, requests: 2, period: 1h}}]
  failureMode: {failure_mode}
""")
    return f


def timed(url: str) -> tuple[int, float]:
    t = time.monotonic()
    status, _ = http_get(url, timeout=5)
    return status, time.monotonic() - t


@pytest.mark.slow
@pytest.mark.parametrize(("failure_mode", "while_down"), [("open", 200), ("closed", 503)])
def test_redis_killed_then_restarted(fresh_redis: object, upstream_process: UpstreamProcess, tmp_path: Path,
                                     failure_mode: str, while_down: int) -> None:
    r = fresh_redis
    sidecar = SidecarProcess(upstream_process.url, "--redis", r.url, "--policy-file",  # type: ignore[attr-defined]
                             str(policy(tmp_path, failure_mode)), "--redis-timeout-ms", "50",
                             "--breaker-cooldown-s", "0.5")
    try:
        assert [timed(sidecar.url + "/a")[0] for _ in range(3)] == [200, 200, 429]
        r.kill()  # type: ignore[attr-defined]
        results = [timed(sidecar.url + "/a") for _ in range(20)]
        assert {s for s, _ in results} == {while_down}
        worst = max(t for _, t in results)
        assert worst < 1.0, f"a decision waited {worst:.3f} s with Redis down"
        decision = "failed_open" if failure_mode == "open" else "failed_closed"
        assert sidecar.metric("sluice_decisions_total", decision=decision) == 20
        assert sidecar.metric("sluice_store_errors_total") >= 20
        assert sidecar.metric("sluice_circuit_state") == 1  # open
        r.restart()  # type: ignore[attr-defined]  # empty: buckets are gone, scripts too
        # Recovery without restarting the sidecar: the breaker probes, NOSCRIPT reloads the
        # script, and the limit applies again (the empty Redis starts a fresh bucket).
        wait_until(lambda: http_get(sidecar.url + "/a")[0] == 429, 10, interval=0.1,
                   what="limit enforced again after Redis came back")
        assert sidecar.metric("sluice_circuit_state") == 0
    finally:
        sidecar.close()


@pytest.mark.slow
def test_redis_stalled_answers_within_the_timeout(fresh_redis: object, upstream_process: UpstreamProcess,
                                                  tmp_path: Path) -> None:
    r = fresh_redis
    sidecar = SidecarProcess(upstream_process.url, "--redis", r.url, "--policy-file",  # type: ignore[attr-defined]
                             str(policy(tmp_path, "open")), "--redis-timeout-ms", "50",
                             "--breaker-threshold", "3", "--breaker-cooldown-s", "0.3")
    try:
        assert timed(sidecar.url + "/a")[0] == 200
        r.pause()  # type: ignore[attr-defined]  # SIGSTOP: connections stay open, nothing answers
        try:
            results = [timed(sidecar.url + "/a") for _ in range(15)]
        finally:
            r.resume()  # type: ignore[attr-defined]
        assert {s for s, _ in results} == {200}
        # Only requests that reached Redis waited (about the 50 ms timeout); once the breaker
        # opened they did not wait at all.
        slow = [t for _, t in results if t > 0.04]
        assert len(slow) <= 3 + 3, [round(t, 3) for _, t in results]
        assert max(t for _, t in results) < 0.5
        assert sidecar.metric("sluice_store_errors_total", reason="timeout") >= 3
        assert sidecar.metric("sluice_store_errors_total", reason="circuit_open") >= 1
        wait_until(lambda: http_get(sidecar.url + "/a")[0] == 429, 10, interval=0.1,
                   what="Redis decisions again after resume")
    finally:
        sidecar.close()
