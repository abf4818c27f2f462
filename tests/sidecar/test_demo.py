"""``sluice demo`` as ``make demo`` runs it (a real process, its own redis-server): the tour's
traffic shows up per client through the usage collector it starts, by the very commands it
prints (``sluice usage top`` and the API), exactly as the tour saw it; the collector is gone
once the demo stops. With the in-memory store it points at the admin port's ``/usage``."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import IO

import pytest
from support.polling import poll

# The tour's clients, in the order of its sections (tests what the demo printed, not a copy).
TOUR_CLIENTS = ["ip:127.0.0.1", "key:demo-pro", "key:demo-enterprise", "key:demo-enterprise", None]
DEMO = [sys.executable, "-m", "sluice_core.cli", "demo", "--port", "0", "--admin-port", "0",
        "--analytics-port", "0"]


def _read_until_serving(out: IO[str]) -> list[str]:
    lines = []
    for line in out:  # bounded by the demo's --duration: it exits, and the pipe ends
        lines.append(line.rstrip("\n"))
        if line.startswith("Serving"):
            break
    return lines


def _tour_counts(lines: list[str]) -> dict[str, Counter[int]]:
    """Per client, the status codes the tour printed (``  GET /api/items x7: 200 ... 429``)."""
    codes = [line.split(": ", 1)[1].split() for line in lines if re.match(r"  (GET|POST) \S+ x\d+: ", line)]
    assert len(codes) == len(TOUR_CLIENTS), lines
    seen: dict[str, Counter[int]] = {}
    for client, cs in zip(TOUR_CLIENTS, codes, strict=True):
        if client is not None:  # /healthz: skipped, counted for the anonymous client
            seen.setdefault(client, Counter()).update(int(c) for c in cs)
    return seen


def _api(url: str, token_file: str) -> object:
    token = Path(token_file).read_text().strip()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_the_demo_shows_the_tour_per_client_through_the_collector() -> None:
    demo = subprocess.Popen([*DEMO, "--store", "redis", "--duration", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert demo.stdout is not None
        lines = _read_until_serving(demo.stdout)
        seen = _tour_counts(lines)
        top = next(line.strip() for line in lines if " usage top " in line and "--by" not in line)
        argv = shlex.split(top)
        url, token_file = argv[argv.index("--url") + 1], argv[argv.index("--token-file") + 1]
        want = {c: sum(s.values()) for c, s in seen.items()}

        def printed_top() -> dict[str, int]:
            run = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, run.stderr
            return {x["client"]: x["requests"] for x in json.loads(run.stdout)["consumers"]
                    if x["client"] in want}

        # The sidecar writes a window a second (the tour may span several); the collector applies
        # each soon after: until then a client's count is short, never over.
        poll(lambda: printed_top() == want, f"the tour's clients in `sluice usage top`: {want}",
             diagnose=lambda: repr(printed_top()))
        for client, s in seen.items():
            got = _api(f"{url}/v1/clients/{client}?namespace=default", token_file)
            assert isinstance(got, dict)
            assert got["outcomes"] == {o: n for o, n in (("allowed", s[200]), ("limited", s[429])) if n}, client
        page = next(line.split()[1] for line in lines if line.startswith("Dashboard: "))
        assert page == f"{url}/?namespace=default"
        with urllib.request.urlopen(page, timeout=5) as r:  # the page itself; its numbers: test_dashboard_browser.py
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:  # a failed assertion: still stopped as Ctrl-C, which stops its children
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait(5)
    assert not Path(token_file).exists()  # its temp dir removed, after the collector was stopped
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/healthz", timeout=2)


def test_the_demo_without_redis_points_at_the_admin_usage() -> None:
    run = subprocess.run([*DEMO, "--store", "memory", "--duration", "0.5", "--no-tour"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    usage = [line for line in run.stdout.splitlines() if line.strip().endswith("/usage")]
    assert usage and "curl -s http://127.0.0.1:" in usage[0]
    assert "usage top" not in run.stdout and "sluice analytics on" not in run.stdout
