"""SIGTERM: the sidecar reports not-ready, keeps serving for --drain-s, then lets in-flight
requests finish before it exits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\n"
                      "spec:\n  tiers: [{name: free, requests: 100, period: 1s}]\n")
    up = UpstreamProcess()
    sidecar = SidecarProcess(up.url, "--policy-file", str(policy), "--drain-s", "1.0",
                             "--shutdown-timeout-s", "10")
    results: dict[str, object] = {}

    def slow_request() -> None:
        results["slow"] = http_get(sidecar.url + "/slow?s=2", timeout=10)

    try:
        t = threading.Thread(target=slow_request)
        t.start()
        wait_until(lambda: sidecar.metric("sluice_inflight_requests") == 1, 10, what="request in flight")
        started = time.monotonic()
        sidecar.proc.send_signal(15)
        # Draining: not ready, but still serving new requests.
        wait_until(lambda: http_get(sidecar.admin + "/readyz")[0] == 503, 5, what="not ready")
        assert http_get(sidecar.url + "/fast")[0] == 200
        assert sidecar.proc.wait(20) == 0
        t.join(10)
        assert results["slow"] == (200, b"ok")  # the in-flight request finished
        assert time.monotonic() - started >= 1.0  # it served through the drain period
    finally:
        sidecar.close()
        up.close()
