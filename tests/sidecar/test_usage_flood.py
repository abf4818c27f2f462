"""Usage bounds under a flood (#10 §5 "Bounds"): 10,000 distinct clients over 150 paths through
a real sidecar process in one window, at the default bounds (1,000 clients, 100 endpoints): the
stream entry holds the bounds, the folded counts are exact, and no request goes uncounted.
(50,000 clients in one window: the in-process test in test_usage_counts.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from sluice_core import usage
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer
from support.usage_stream import usage_of, windows

CLIENTS = 10_000  # ten times the default bound of 1,000 clients a window
PATHS = 150
WORKERS = 32
DEADLINE_S = 300.0  # bounds the flood on a busy machine; not a speed assertion

pytestmark = pytest.mark.slow


async def _flood(url: str) -> int:
    next_i = 0
    ok = 0
    deadline = time.monotonic() + DEADLINE_S

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal next_i, ok
        while next_i < CLIENTS and time.monotonic() < deadline:
            i, next_i = next_i, next_i + 1
            async with http.get(f"{url}/p{i % PATHS}/x", headers={"X-Client": f"client-{i}"}) as r:
                await r.read()
                ok += r.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WORKERS)) as http:
        await asyncio.gather(*(worker(http) for _ in range(WORKERS)))
    return ok


def test_ten_thousand_clients_through_a_sidecar_stay_within_the_bounds(redis_server: RedisServer,
                                                                       tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("""apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: flood, namespace: usage-flood}
spec:
  identify: {order: [header, ip], header: X-Client, headerFrom: trustedProxiesOrLoopback}
  tiers: [{name: free, requests: 10, period: 1h}]
""")
    up = UpstreamProcess()
    sidecar = SidecarProcess(up.url, "--policy-file", str(policy), "--redis", redis_server.url,
                             "--usage-window-s", "3600", "--redis-timeout-ms", "2000",
                             "--max-connections-per-client", "1024")
    try:
        source = usage_of(sidecar)["source"]
        assert asyncio.run(_flood(sidecar.url)) == CLIENTS, "the flood did not finish in time"
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()
        up.close()
    got = windows(redis_server, source)
    assert sum(r.requests for w in got for r in w.rows) == CLIENTS
    for w in got:
        assert len(w.rows) <= usage.MAX_ROWS
        assert len({r.client for r in w.rows} - {usage.OTHER}) <= 1_000
        assert len({r.endpoint for r in w.rows} - {usage.OTHER}) <= 100
    if len(got) == 1:  # one window (the hour did not turn): the folded counts are exact
        w = got[0]
        assert w.folded_clients == CLIENTS - 1_000
        assert w.folded_endpoints == sum(1 for i in range(CLIENTS) if i % PATHS >= 100)
