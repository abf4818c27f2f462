"""``sluice operator`` as a subprocess against the real API server, on free loopback ports, with
its log kept for the failing test's report."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.redis_servers import pick_port


class OperatorProcess:
    """``identity`` names it in reports (and is its kopf ``POD_ID``); ``args`` come after
    ``--redis``; the liveness and metrics ports are chosen here, and a webhook port is picked
    for callers that serve webhooks (``--webhook-listen 127.0.0.1:<webhook_port>``)."""

    def __init__(self, identity: str, kubeconfig: Path, redis_url: str, workdir: Path,
                 args: list[str], *, webhook_port: int | None = None) -> None:
        self.identity = identity
        self.log_path = workdir / f"{identity}.log"
        self.webhook_port = webhook_port or pick_port()
        self.liveness_port, self.metrics_port = pick_port(), pick_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KUBERNETES_", "SLUICE_OPERATOR_"))}
        env.update(KUBECONFIG=str(kubeconfig), POD_ID=identity)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice_core.cli", "operator", "--redis", redis_url,
             "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz",
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def report(self, lines: int = 60) -> str:
        kept = [ln for ln in self.log().splitlines() if "Keep-alive" not in ln]
        return f"--- {self.identity} ({self.log_path})\n" + "\n".join(kept[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.identity} exited with {self.proc.returncode}\n{self.report()}")

    def counter(self, name: str) -> float:
        """The sum of a counter over its labels, from the operator's /metrics."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return sum(float(m[1]) for m in re.finditer(
            rf"^{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
