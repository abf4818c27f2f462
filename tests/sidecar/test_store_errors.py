"""Errors that switch limiting off are reported with their reason: a wrong Redis password (``auth``)
and a Redis at ``maxmemory`` under ``noeviction`` (``oom``), each as one ERROR line per change (not
one per request or per probe), a ``reason`` label of ``sluice_store_errors_total`` and the store's
``error`` in ``/readyz``. And the configuration Sluice documents (``volatile-ttl``) keeps deciding
under the same identity churn that breaks ``noeviction``."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.polling import wait_for, wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisServer
from support.sidecar_harness import RunningSidecar, Upstream, policy_doc, start_sidecar

PASSWORD = "not-the-password-7f3a"
CHURN_S = 60.0  # bound of every churn loop (they end much sooner)


def test_wrong_password_is_one_error_line_with_the_reason(upstream_process: UpstreamProcess,
                                                           tmp_path: Path) -> None:
    with RedisServer() as r:
        r.execute("CONFIG", "SET", "requirepass", "the-right-one")  # after the harness's PING
        f = tmp_path / "policy.yaml"
        f.write_text(json.dumps(policy_doc(failureMode="open")))
        sidecar = SidecarProcess(upstream_process.url, "--redis", f"redis://:{PASSWORD}@127.0.0.1:{r.port}",
                                 "--policy-file", str(f), "--breaker-threshold", "3",
                                 "--breaker-cooldown-s", "0.1")
        try:
            wait_until(lambda: http_get(sidecar.url + "/a")[0] == 200
                       and sidecar.metric("sluice_circuit_state") == 1, 10, what="the breaker open")
            # The breaker keeps probing (and failing): still one line.
            wait_until(lambda: sidecar.metric("sluice_store_probes_total", result="failed") >= 5, 10,
                       what="five failed probes")
            assert [http_get(sidecar.url + "/a")[0] for _ in range(20)] == [200] * 20  # failing open
            # Refused by Redis (auth), or, once the breaker is open, at once (circuit_open).
            assert (sidecar.metric("sluice_store_errors_total", reason="auth")
                    + sidecar.metric("sluice_store_errors_total", reason="circuit_open")) >= 20
            _, body = http_get(f"{sidecar.admin}/readyz")
            assert json.loads(body)["store"]["error"] == "auth"
            log = sidecar.output()
            errors = [line for line in log.splitlines() if " ERROR " in line]
            assert len(errors) == 1, log
            assert "(auth)" in errors[0] and "WRONGPASS" in errors[0], errors[0]
            # The topology's own sentence, as before the transport room: refused, not "unavailable".
            assert "failing (auth): redis refused the connection: WRONGPASS" in errors[0], errors[0]
            assert PASSWORD not in log
        finally:
            sidecar.close()


# Identity churn against a Redis at maxmemory ---------------------------------------------------
def churn_policy() -> dict[str, Any]:
    """5 a day per client IP (a bucket lives for hours), the test client a trusted proxy so that
    each X-Forwarded-For is a new identity, failing open (the dangerous case)."""
    return policy_doc(tiers=[{"name": "free", "requests": 5, "period": "1d"}], failureMode="open",
                      identify={"order": ["ip"], "trustedProxies": ["127.0.0.1/32"]})


async def churn(sidecar: RunningSidecar, ips: Iterator[str], n: int) -> list[int]:
    """``n`` requests, each from a new client IP (8 at a time); their statuses."""
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            async with session.get(sidecar.url + "/a", headers={"X-Forwarded-For": next(ips)}) as resp:
                statuses.append(resp.status)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHURN_S
        while len(statuses) < n and loop.time() < deadline:
            await asyncio.gather(*(one() for _ in range(8)))
    return statuses


def client_ips() -> Iterator[str]:
    return (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count(1))


def store_errors(sidecar: RunningSidecar, reason: str) -> float:
    value = sidecar.sidecar.metrics.registry.get_sample_value(
        "sluice_store_errors_total", {"store": "redis", "reason": reason})
    return value or 0.0


def limit_memory(r: RedisServer, policy: str, headroom: int) -> None:
    """maxmemory = what Redis uses now + ``headroom`` bytes, under ``policy``."""
    used = int(r.client().info("memory")["used_memory"])
    r.execute("CONFIG", "SET", "maxmemory-policy", policy)
    r.execute("CONFIG", "SET", "maxmemory", str(used + headroom))


async def test_noeviction_full_of_buckets_is_reported_as_oom_once(
        fresh_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    up = await Upstream().start()
    running = await start_sidecar(tmp_path, churn_policy(), upstream=up, redis=fresh_redis.url)
    ips = client_ips()
    try:
        assert await churn(running, ips, 8) == [200] * 8  # connected, script loaded
        limit_memory(fresh_redis, "noeviction", 200_000)
        caplog.set_level(logging.WARNING, logger="sluice")
        # Until a whole round of 64 new clients is refused by Redis (near the limit, a decision
        # now and then still fits in what a refused one left free); all of them fail open.
        await wait_for(lambda: _all_oom(running, ips), timeout=CHURN_S, interval=0,
                       what="a round of decisions all refused with OOM")
        assert store_errors(running, "unavailable") == store_errors(running, "timeout") == 0
        assert running.sidecar.components()["store"]["error"] == "oom"
        assert running.sidecar.breaker.state.name == "CLOSED"  # OOM replies cost no waiting
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "(oom)" in errors[0].getMessage() and "OOM" in errors[0].getMessage()
    finally:
        await running.stop()
        await up.close()


async def _all_oom(running: RunningSidecar, ips: Iterator[str]) -> bool:
    before = store_errors(running, "oom")
    statuses = await churn(running, ips, 64)
    assert statuses == [200] * 64  # failureMode open
    return store_errors(running, "oom") - before == 64


async def test_volatile_ttl_keeps_deciding_under_the_same_churn(fresh_redis: RedisServer,
                                                                tmp_path: Path) -> None:
    up = await Upstream().start()
    running = await start_sidecar(tmp_path, churn_policy(), upstream=up, redis=fresh_redis.url)
    ips = client_ips()
    try:
        assert await churn(running, ips, 8) == [200] * 8
        limit_memory(fresh_redis, "volatile-ttl", 200_000)

        async def evicting() -> bool:
            await churn(running, ips, 64)
            return int(fresh_redis.client().info("stats")["evicted_keys"]) > 0

        await wait_for(evicting, timeout=CHURN_S, interval=0, what="Redis full and evicting buckets")
        statuses = await churn(running, ips, 400)  # past full: buckets are evicted, never refused
        assert statuses == [200] * 400
        decided = running.sidecar.metrics.registry.get_sample_value(
            "sluice_decisions_total", {"policy": "test-api", "tier": "free", "rule": "", "decision": "allowed"})
        assert decided is not None and decided >= 400
        assert sum(store_errors(running, reason) for reason in
                   ("oom", "refused", "timeout", "unavailable", "auth", "circuit_open")) == 0
        assert running.sidecar.components()["store"]["error"] is None
    finally:
        await running.stop()
        await up.close()
