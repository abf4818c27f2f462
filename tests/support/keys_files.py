"""Keys files of any size for ``sluice apply --api-keys-file`` (tests and bench/keys_apply.py),
and running a command while measuring its peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POLICY = """\
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  apiKeys: {{header: X-API-Key}}
  tiers:
    - {{name: free, requests: 10, period: 1m}}
    - {{name: pro, requests: 100, period: 1m}}
"""


def key(salt: str, i: int) -> str:
    """The plaintext of key ``i`` of a generated file."""
    return f"sk-{salt}-{i:08d}"


def entry(salt: str, i: int) -> str:
    """Key ``i``'s line: mostly a tier, every 10th its own limit, every 50th an id and expiry."""
    k = key(salt, i)
    if i % 50 == 0:
        return f'  "{k}": {{tier: pro, id: cust-{i}, expiresAt: "2099-01-01T00:00:00Z"}}\n'
    if i % 10 == 0:
        return f'  "{k}": {{tier: free, limit: {{requests: 20, period: 1m}}}}\n'
    return f'  "{k}": {"pro" if i % 2 else "free"}\n'


def write_keys_file(path: Path, salt: str, indices: range) -> Path:
    with path.open("w") as f:
        f.write("keys:\n")
        for i in indices:
            f.write(entry(salt, i))
    return path


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kb: int  # the process's own (wait4), not its parent's


def run_measured(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> Measured:
    """Run ``args``, wait at most ``timeout`` s (then kill it and raise), measure its peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{args[:4]} did not finish in {timeout:.0f}s")
            time.sleep(0.02)  # polling the child's exit: no synchronisation on a sleep
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read().decode(), err.read().decode(), seconds, usage.ru_maxrss)


def sluice_apply(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice_core.cli", "apply", *args]
