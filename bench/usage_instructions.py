"""Instructions per proxied request of a sidecar, counted by valgrind's callgrind: the measure of
:mod:`bench.usage_sidecar` that a busy machine does not move.

CPU time per request on a shared 2-core machine swings by ±15 % from one round to the next as
neighbours come and go, more than the 5 % that usage counting may cost. Instructions retired do
not depend on who else runs (callgrind simulates the CPU; no hardware counters are needed, and
this VM has none), so on/off compare within a few per cent. What instructions miss: cache misses
and branch mispredictions, which make an instruction of the request path dearer than one of a
tight loop (that is why the in-process µs of the usage path once read 1.4 µs where the process
paid ~5 µs; the instruction counts agree with the process, see docs/benchmarks.md).

One run: the sidecar under ``valgrind --tool=callgrind --instr-atstart=no`` (~50x slower), loaded
by wrk (16 connections) for the whole run; counting is switched on (``callgrind_control -i on``)
once the load runs and off before it stops, so start-up, connection set-up and tear-down are left
out; the requests are ``sluice_decisions_total`` read before and after from the admin port.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CONNECTIONS = 16
READY_TIMEOUT_S = 300.0  # start-up under valgrind on a busy machine


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def _decisions(admin: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30).read().decode()
    return sum(float(v) for v in re.findall(r"^sluice_decisions_total\{[^}]*\} (\S+)$", body, re.M))


def _wait_ready(admin: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sidecar under callgrind did not get ready") from None
            time.sleep(1)


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _total(out: Path) -> int:
    """The instructions of the dump callgrind_control -d wrote (``<out>.1``), once complete."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dump = out.with_name(out.name + ".1")
        m = dump.exists() and re.search(r"^totals:\s+(\d+)", dump.read_text(errors="replace"), re.M)
        if m:
            return int(m.group(1))
        time.sleep(0.5)
    raise RuntimeError("callgrind wrote no dump")


def instructions_per_request(sidecar_args: list[str], port: int, admin: int, script: Path, seconds: float,
                             work: Path) -> float:
    """Instructions per request of one sidecar run (``sidecar_args``: after ``sluice sidecar``,
    listening on ``port`` and ``admin``), counted over ``seconds`` of wrk load."""
    out = work / f"callgrind.{port}"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                             sys.executable, "-m", "sluice_core.cli", "sidecar", *sidecar_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load: subprocess.Popen[bytes] | None = None
    try:
        _wait_ready(admin, proc)
        url = f"http://127.0.0.1:{port}/"
        load = subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{int(seconds) + 8}s", "-s", str(script), url],
                                stdout=subprocess.DEVNULL)
        time.sleep(4)  # connections open, pools and caches warm
        before = _decisions(admin)
        _control(proc.pid, "-i", "on")
        time.sleep(seconds)
        _control(proc.pid, "-i", "off")
        requests = _decisions(admin) - before
        load.wait()
        _control(proc.pid, "-d")
        return _total(out) / max(1.0, requests)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
