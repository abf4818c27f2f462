"""`python -m bench.image` still runs (it is not part of the suite: it starts the sidecar from
the image many times); once, one start-up of each kind, into a scratch file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.oci_image import build_images
from support.paths import ROOT

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_the_image_benchmark_runs(tmp_path: Path) -> None:
    build_images()
    out = tmp_path / "benchmarks.md"
    res = subprocess.run([sys.executable, "-m", "bench.image", "--runs", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| OCI archive (compressed layers) |", "| root filesystem, unpacked |",
                "| development virtualenv (baseline) |", "| the image's root filesystem"):
        assert row in text, f"{row} missing from\n{text}"
