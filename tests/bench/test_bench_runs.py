"""The benchmarks still run: ``make bench`` is not part of the suite (its figures take minutes
and a quiet machine), so the code it runs would otherwise rot unseen between benchmark runs.
Each benchmark here runs briefly, its figures meaningless, into a scratch file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import ROOT


def test_the_transport_micro_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench.transport", "--scale", "100", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| Sluice RESP client (transport/resp.py) |", "| redis-py asyncio |",
                "| Sluice HTTP pool (transport/httppool.py) |", "| aiohttp ClientSession |"):
        assert row in text, f"{row} missing from\n{text}"


def test_the_keys_apply_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench.keys_apply", "--scale", "1000", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| 10 | embedded document (before) |", "| 1,000 | grants (now) |"):
        assert row in text, f"{row} missing from\n{text}"


def test_the_collector_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench.collector", "--scale", "30", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| SQLite | 200 |", "| PostgreSQL | 1 (baseline) |", "| PostgreSQL | "):
        assert row in text, f"{row} missing from\n{text}"


def test_the_usage_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    # The callgrind rounds (minutes under valgrind) are left out: their row says so.
    res = subprocess.run([sys.executable, "-m", "bench.usage_sidecar", "--seconds", "1", "--rounds", "1",
                          "--callgrind-rounds", "0", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| proxy CPU per request |", "| proxy instructions per request (callgrind) | – |",
                "| Redis commands per request caused by usage (`cmdstat_xadd`) |"):
        assert row in text, f"{row} missing from\n{text}"


def test_the_usage_summary_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench.usage_summary", "--scale", "50", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| baseline: `/v1/top?by=limited`", "| the summary of every policy", "bytes a policy"):
        assert row in text, f"{row} missing from\n{text}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (make bench installs it)")
def test_the_usage_instruction_count_runs() -> None:
    # In-process only (the whole-sidecar rounds take minutes under valgrind), few iterations.
    res = subprocess.run([sys.executable, "-m", "bench.usage_instructions", "-n", "200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage path per request, in-process:" in res.stdout, res.stdout
