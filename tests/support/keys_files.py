"""Keys files of any size for ``sluice apply --api-keys-file`` (tests and bench/keys_apply.py),
and running a command while measuring its peak RSS."""

from __future__ import annotations

import os
import signal
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


def entry(salt: str, i: int, *, fields: bool = True) -> str:
    """Key ``i``'s line: mostly a tier, every 10th its own limit, every 50th an id and expiry
    (with ``fields``: what only the streaming `sluice apply` reads)."""
    k = key(salt, i)
    if fields and i % 50 == 0:
        return f'  "{k}": {{tier: pro, id: cust-{i}, expiresAt: "2099-01-01T00:00:00Z"}}\n'
    if i % 10 == 0:
        return f'  "{k}": {{tier: free, limit: {{requests: 20, period: 1m}}}}\n'
    return f'  "{k}": {"pro" if i % 2 else "free"}\n'


def write_keys_file(path: Path, salt: str, indices: range, *, fields: bool = True) -> Path:
    with path.open("w") as f:
        f.write("keys:\n")
        for i in indices:
            f.write(entry(salt, i, fields=fields))
    return path


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kb: int  # the process's own (wait4), not its parent's


# Linux records a process's peak RSS across exec, and a child forked (or vforked) from a large
# parent starts from the parent's: a test runner of 300 MB would read 300 MB for `true`. So a
# small Python launcher runs the command and reports the command's own peak (wait4) on a file.
_LAUNCHER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> Measured:
    """Run ``args``, wait at most ``timeout`` s (then kill it and raise), measure its peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        out, err, rss = Path(d, "out"), Path(d, "err"), Path(d, "rss")
        with out.open("wb") as o, err.open("wb") as e:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rss), *args], stdout=o, stderr=e,
                                    env=env, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group: it and the command
                proc.wait()
                raise TimeoutError(f"{args[:4]} did not finish in {timeout:.0f}s") from None
            seconds = time.perf_counter() - start
        return Measured(proc.returncode, out.read_text(), err.read_text(), seconds, int(rss.read_text()))


def sluice_apply(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice_core.cli", "apply", *args]
