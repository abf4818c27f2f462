"""The demo's usage collector: ``sluice analytics`` as a subprocess next to ``sluice demo``.

The sidecar package never imports the collector (import-linter keeps the rooms apart): the
demo runs it as ``python -m sluice_analytics`` on a SQLite file in the demo's temp dir, with a
standalone API token generated into a file there (mode 0600), and stops it by its PID at exit.
Only with Redis: the sidecar's windows reach the collector through the Redis stream; with the
in-memory store usage stays on the sidecar's admin port (``/usage``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

# The demo's windows: short, so the tour's traffic is in the API a second or two later.
DEMO_USAGE_WINDOW_S = 1.0


def _exit_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel SIGTERM the collector when the demo dies
    without stopping it (``kill -9``), so it is never left behind; elsewhere None. Forked from
    the main thread only: the signal follows the thread that forked."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def available() -> bool:
    """Whether ``sluice_analytics`` is installed next to the sidecar (looked up, not imported)."""
    return importlib.util.find_spec("sluice_analytics") is not None


class DemoCollector:
    """``sluice analytics run`` on ``redis_url``, its API and ``/metrics`` on ``port``."""

    def __init__(self, redis_url: str, port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-demo-usage-"))
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.database = f"sqlite:///{self.dir / 'usage.db'}"
        self.token_file = self.dir / "api-token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        self.log = self.dir / "analytics.log"
        argv = [sys.executable, "-m", "sluice_analytics", "run", "--redis", redis_url,
                "--database", self.database, "--listen", f"127.0.0.1:{port}",
                "--api-token-file", str(self.token_file), "--consumer", "demo",
                "--block-ms", "500", "--log-level", "warning"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_exit_with_parent())

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ``/healthz`` answers (migrations run first); the log's tail if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice analytics exited with {self.proc.returncode}:\n{self.log_tail()}")
            # 503 (an HTTPError, an OSError) until its first read of the stream
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"sluice analytics did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to its PID (it finishes the batch it is in), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def sluice_command() -> str:
    """How to run ``sluice`` from a shell: the script next to this interpreter (a virtualenv's
    bin, where ``make demo`` runs it from), else whatever ``sluice`` is on the PATH."""
    script = Path(sys.executable).parent / "sluice"
    return str(script) if script.exists() else "sluice"


def instructions(c: DemoCollector, namespace: str) -> str:
    """What the demo prints to see its traffic per client: the CLI and the API."""
    cli = f"{sluice_command()} usage top --namespace {namespace} --url {c.url} --token-file {c.token_file}"
    auth = f"-H \"Authorization: Bearer $(cat {c.token_file})\""
    return f"""
Dashboard: {c.url}/?namespace={namespace}  (sign in with the token in {c.token_file})

Usage per client (sluice analytics on {c.url}, SQLite {c.database}; windows of {DEMO_USAGE_WINDOW_S:.0f} s):
  {cli}
  {cli} --by limited
  curl -s {auth} '{c.url}/v1/top?namespace={namespace}'          # the last hour
  curl -s {auth} '{c.url}/v1/clients/key:demo-pro?namespace={namespace}'
  curl -s {auth} '{c.url}/v1/limited?namespace={namespace}'      # refused in the last 5 minutes"""
