"""``sluice analytics`` as a real subprocess (``python -m sluice_analytics``), on a free loopback
port for ``/metrics`` and ``/healthz``; optionally told to die at a crash point
(``SLUICE_ANALYTICS_CRASH_AT``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from support.polling import poll
from support.processes import http_get
from support.redis_servers import death_signal_preexec, pick_port


class CollectorProcess:
    def __init__(self, redis_url: str, database_url: str, *, consumer: str = "c1",
                 crash_at: str | None = None, claim_idle_s: float = 60.0, batch: int = 20,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = pick_port()
        self.log = Path(tempfile.mkstemp(prefix="sluice-analytics-", suffix=".log")[1])
        env = dict(os.environ)
        env.pop("SLUICE_ANALYTICS_CRASH_AT", None)
        if crash_at:
            env["SLUICE_ANALYTICS_CRASH_AT"] = crash_at
        argv = [sys.executable, "-m", "sluice_analytics", "run", "--redis", redis_url,
                "--database", database_url, "--consumer", consumer, "--listen", f"127.0.0.1:{self.port}",
                "--batch", str(batch), "--block-ms", "200", "--claim-idle-s", str(claim_idle_s),
                "--rollup-interval-s", "3600", "--log-level", "debug", *extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log,
                                         preexec_fn=death_signal_preexec())
        poll(lambda: self.proc.poll() is not None or self._answers(), "the collector's /healthz",
             timeout=30, diagnose=self.log_tail)

    def _answers(self) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)[0] in (200, 503)
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """``name`` → value of every unlabelled sample (``_total`` kept in the name)."""
        status, body = http_get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        try:
            return self.metrics().get(name, 0.0)
        except OSError:
            return 0.0

    def wait_died(self, timeout: float = 60) -> int:
        poll(lambda: self.proc.poll() is not None, "the collector to die at its crash point", timeout=timeout,
             diagnose=self.log_tail)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.unlink(missing_ok=True)
