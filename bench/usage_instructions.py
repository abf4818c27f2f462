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

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def loop_instructions(func: str, n: int, work: Path) -> float:
    """Instructions per iteration of ``bench.usage_sidecar.<func>(n)`` run in-process under
    callgrind: the difference between runs of ``2n`` and ``n`` iterations, over ``n``."""
    totals = []
    for i, count in enumerate((n, 2 * n)):
        out = work / f"callgrind.loop.{func}.{i}"
        code = f"from bench.usage_sidecar import {func}; {func}({count})"
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", code],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
        assert m, f"no totals in {out}"
        totals.append(int(m.group(1)))
    return (totals[1] - totals[0]) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="iterations of the in-process loops")
    ap.add_argument("--sidecar-rounds", type=int, default=0,
                    help="rounds of whole-sidecar counts, usage on and off (minutes each)")
    ap.add_argument("--sidecar-seconds", type=int, default=15)
    args = ap.parse_args()
    if not available():
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="sluice-usage-instructions-"))
    path = loop_instructions("usage_path_cost", args.n, work)
    record = loop_instructions("record_cost", args.n, work)
    print(f"usage path per request, in-process: {path:,.0f} instructions; record alone: {record:,.0f} "
          f"(callgrind, PYTHONHASHSEED=0, {args.n:,} iterations, difference of two runs)")
    if args.sidecar_rounds:
        from bench import usage_sidecar

        on, off = usage_sidecar.sidecar_instructions(args.sidecar_rounds, args.sidecar_seconds, work)
        print(f"whole sidecar, instructions per request: on {', '.join(f'{c / 1000:.1f}' for c in on)} k; "
              f"off {', '.join(f'{c / 1000:.1f}' for c in off)} k; on/off "
              f"{', '.join(f'{a / b:.3f}' for a, b in zip(on, off, strict=True))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
