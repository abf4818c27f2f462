"""The dashboard's committed bundle (``sluice_analytics/static``) is what its sources build to:
a copy of ``analytics/web`` without ``node_modules``, installed with ``npm ci`` from the
package-lock (from npm's cache when it has the packages) and built, gives byte-identical
files; and the page's code passes its checks (tsc strict, biome lint)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "analytics" / "web"
STATIC = ROOT / "analytics" / "sluice_analytics" / "static"


def _run(argv: list[str], cwd: Path, **env: str) -> None:
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_rebuilding_gives_the_committed_bundle(tmp_path: Path) -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("node and npm are missing: `make` installs Debian's nodejs and npm as root "
                    "(hack/ensure-node.sh); otherwise: sudo apt-get install nodejs npm")
    web = tmp_path / "web"
    shutil.copytree(WEB, web, ignore=shutil.ignore_patterns("node_modules"))
    _run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"], web)
    out = tmp_path / "out"
    _run(["node", "build.mjs"], web, SLUICE_DASHBOARD_OUT=str(out))
    built = sorted(p.name for p in out.iterdir())
    assert built == sorted(p.name for p in STATIC.iterdir())
    for name in built:
        assert (out / name).read_bytes() == (STATIC / name).read_bytes(), (
            f"static/{name} is not what analytics/web builds: run `make dashboard` and commit it")
    _run(["npm", "run", "--silent", "check"], web)
