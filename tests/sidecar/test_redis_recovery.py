"""Redis comes back (restarted, or resumed after SIGSTOP) under ``failureMode: closed``: the
circuit breaker finds out by itself, in the background, and the requests that follow are all
decided by Redis again; no client request is spent (or refused) probing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisServer, ping

FOLLOWING = 50  # requests in a row after the breaker closed: none may get a 503


def closed_policy(tmp_path: Path) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text("""
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api}
spec:
  tiers: [{name: free, requests: 1000, period: 1h}]
  failureMode: closed
""")
    return f


def circuit(sidecar: SidecarProcess) -> str:
    _, body = http_get(f"{sidecar.admin}/readyz")
    return str(json.loads(body)["store"]["circuit"])


def decisions(sidecar: SidecarProcess) -> float:
    return sidecar.metric("sluice_decisions_total")


@pytest.mark.parametrize("trouble", ["restart", "sigstop"])
def test_recovered_redis_serves_the_next_request(fresh_redis: RedisServer, upstream_process: UpstreamProcess,
                                                 tmp_path: Path, trouble: str) -> None:
    r = fresh_redis
    sidecar = SidecarProcess(upstream_process.url, "--redis", r.url, "--policy-file", str(closed_policy(tmp_path)),
                             "--redis-timeout-ms", "50", "--breaker-threshold", "3",
                             "--breaker-cooldown-s", "0.3")
    try:
        assert http_get(sidecar.url + "/a")[0] == 200
        if trouble == "restart":
            r.kill()
        else:
            r.pause()
        try:
            # Requests fail closed until the breaker opens (then they fail at once).
            wait_until(lambda: http_get(sidecar.url + "/a", timeout=5)[0] == 503 and circuit(sidecar) == "open",
                       10, what="the breaker open with Redis gone")
        finally:
            if trouble == "restart":
                r.restart()  # empty: no script cached, no buckets
            else:
                r.resume()
        wait_until(lambda: ping(r.host, r.port), 10, what="Redis answering PING again")
        before = decisions(sidecar)
        # No client request from here until the breaker reports closed: it must close by itself.
        wait_until(lambda: circuit(sidecar) == "closed", 10, interval=0.05,
                   what="the breaker closed by its own probe")
        assert decisions(sidecar) == before, "a client request was needed to close the breaker"
        statuses = [http_get(sidecar.url + "/a", timeout=5)[0] for _ in range(FOLLOWING)]
        assert statuses == [200] * FOLLOWING
        assert sidecar.metric("sluice_decisions_total", decision="allowed") >= FOLLOWING + 1
    finally:
        sidecar.close()
