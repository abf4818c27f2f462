"""Exactness under contention: two sidecar processes share one Redis; many concurrent clients
hammer one API key for a few seconds. Admitted requests stay within burst + rate * t over the
run and are not below it by more than one token."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from support.processes import SidecarProcess, UpstreamProcess

RATE = 40  # tokens per second
BURST = 15
DURATION = 2.5  # seconds of load (bounded)
CLIENTS = 24


async def hammer(urls: list[str], key: str) -> tuple[int, int, float, float]:
    admitted = refused = 0
    first_recv = last_send = 0.0
    start = time.monotonic()
    stop_at = start + DURATION

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal admitted, refused, first_recv, last_send
        url = urls[i % len(urls)]
        while time.monotonic() < stop_at:
            last_send = max(last_send, time.monotonic())
            async with http.get(url, headers={"X-API-Key": key}) as r:
                await r.read()
                if not first_recv:
                    first_recv = time.monotonic()
                if r.status == 200:
                    admitted += 1
                elif r.status == 429:
                    refused += 1
                else:
                    raise AssertionError(f"unexpected status {r.status}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
    end = time.monotonic()
    return admitted, refused, end - start, last_send - first_recv


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_two_sidecars_share_one_exact_limit(request: pytest.FixtureRequest, topology: str,
                                                  upstream_process: UpstreamProcess, tmp_path: Path) -> None:
    server = request.getfixturevalue("redis_server" if topology == "single" else "redis_cluster")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: contention-{topology}}}
spec:
  identify: {{order: [apiKey]}}
  apiKeys: {{required: true}}
  tiers: [{{name: pro, requests: {RATE}, period: 1s, burst: {BURST}}}]
""")
    keys = tmp_path / "keys.yaml"
    key = f"contention-key-{time.time_ns()}"
    keys.write_text(f"keys:\n  {key}: pro\n")
    args = ("--redis", server.url, "--policy-file", str(policy), "--api-keys-file", str(keys),
            "--redis-timeout-ms", "1000")
    sidecars = [SidecarProcess(upstream_process.url, *args) for _ in range(2)]
    try:
        admitted, refused, outer, inner = await hammer([s.url for s in sidecars], key)
    finally:
        for s in sidecars:
            s.close()
    upper = BURST + RATE * outer
    lower = BURST + RATE * inner - 1
    print(f"{topology}: admitted {admitted}, refused {refused}, window {outer:.3f}s "
          f"(bounds {lower:.1f} .. {upper:.1f})")
    assert refused > admitted, "the load must exceed the limit for this test to mean anything"
    assert admitted <= upper
    assert admitted >= lower
