"""Bucket inspection and reset against real buckets: a real sidecar takes them in a real Redis
with the real decision script; the API (``/v1/buckets``) and the CLI (``sluice bucket``) read
them through the core's key schema and reset them. The audit log line holds no key material."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sluice_analytics.api import ApiContext
from sluice_analytics.auth import TokenFile
from sluice_core import cli, configdoc, configstore, keyschema
from sluice_core.parse import parse_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from support.analytics_api import AUTH, api_client
from support.redis_servers import RedisServer
from support.sidecar_harness import policy_doc, start_sidecar

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def the_policy(name: str) -> dict[str, Any]:
    # An hour's period: no token comes back while the test runs, whatever its pace.
    return policy_doc(name, "default", tiers=[{"name": "free", "requests": 5, "period": "1h", "burst": 5}],
                      identify={"order": ["ip"], "trustedProxies": ["127.0.0.1/32"]},
                      rules=[{"name": "exp", "match": {"path": {"prefix": "/exp"}},
                              "limit": {"requests": 4, "period": "1h", "burst": 4}}])


@pytest.fixture
async def setup(tmp_path: Path, engine: AsyncEngine, token_file: str,
                redis_server: RedisServer, upstream: Any) -> AsyncIterator[dict[str, Any]]:
    name = f"b-{uuid.uuid4().hex[:8]}"
    doc = the_policy(name)
    async with configstore.connect(redis_server.url) as redis:
        await configstore.publish(redis, "default", configdoc.build_doc("default", [parse_policy(doc)]))
        # A generous Redis timeout: on a loaded machine the default 50 ms could fail a decision
        # open, and the buckets would not hold what the test counts.
        sc = await start_sidecar(tmp_path, doc, upstream=upstream, redis=redis_server.url, redis_timeout_ms=5000)
        api = await api_client(ApiContext(engine, TokenFile(token_file), redis))
        async with aiohttp.ClientSession() as http:
            yield {"name": name, "sidecar": sc, "api": api, "http": http, "redis": redis,
                   "ip": f"10.77.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
        await api.close()
        await sc.stop()


async def send(s: dict[str, Any], path: str) -> int:
    async with s["http"].get(s["sidecar"].url + path, headers={"X-Forwarded-For": s["ip"]}) as r:
        return int(r.status)


async def buckets_seen(api: TestClient[web.Request, web.Application], s: dict[str, Any]) -> dict[str, Any]:
    resp = await api.get("/v1/buckets", params={"namespace": "default", "policy": s["name"],
                                                "client": f"ip:{s['ip']}"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return {b["name"]: b for b in (await resp.json())["buckets"]}


async def test_api_reads_and_resets_real_buckets(setup: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    fresh = await buckets_seen(s["api"], s)
    assert {n: (b["remaining"], b["capacity"], b["full_in_ms"]) for n, b in fresh.items()} == {
        "free": (5, 5, 0), "exp": (4, 4, 0)}
    assert [await send(s, "/a") for _ in range(3)] + [await send(s, "/exp") for _ in range(2)] == [200] * 5
    assert await send(s, "/a") == 429
    used = await buckets_seen(s["api"], s)
    assert (used["free"]["remaining"], used["exp"]["remaining"]) == (0, 2)
    assert used["free"]["full_in_ms"] > 0 and used["free"]["next_token_in_ms"] > 0

    with caplog.at_level(logging.INFO, logger="sluice.analytics.api"):
        resp = await s["api"].delete("/v1/buckets", params={"namespace": "default", "policy": s["name"],
                                                            "client": f"ip:{s['ip']}"}, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["deleted"] == 2
    lines = [r.getMessage() for r in caplog.records if "bucket reset" in r.getMessage()]
    assert len(lines) == 1 and f"default/{s['name']}" in lines[0]
    client_id = keyschema.client_for_ip(s["ip"])
    assert client_id not in lines[0] and s["ip"] not in lines[0] and "sl:{" not in lines[0]
    again = await buckets_seen(s["api"], s)
    assert (again["free"]["remaining"], again["exp"]["remaining"], again["free"]["full_in_ms"]) == (5, 4, 0)
    assert await send(s, "/a") == 200


async def test_unknown_policy_is_404(setup: dict[str, Any]) -> None:
    resp = await setup["api"].get("/v1/buckets", params={"namespace": "default", "policy": "nope",
                                                         "client": "ip:10.0.0.1"}, headers=AUTH)
    assert resp.status == 404 and resp.content_type == "application/problem+json"


def sluice(*argv: str) -> int:
    return cli.main(list(argv))


async def test_cli_bucket_get_and_reset(setup: dict[str, Any], redis_server: RedisServer,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    s = setup
    assert [await send(s, "/exp") for _ in range(4)] == [200] * 4
    base = ("--redis", redis_server.url, "--namespace", "default", "--policy", s["name"], "--client", f"ip:{s['ip']}")
    assert await asyncio.to_thread(sluice, "bucket", "get", *base, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert {b["name"]: b["remaining"] for b in got["buckets"]} == {"free": 1, "exp": 0}
    assert await asyncio.to_thread(sluice, "bucket", "get", *base) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["KIND", "NAME", "REMAINING", "CAPACITY"] and len(table) == 3
    assert await asyncio.to_thread(sluice, "bucket", "reset", *base, "--json") == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 2
    assert await asyncio.to_thread(sluice, "bucket", "get", *base, "--json") == 0
    assert {b["name"]: b["remaining"] for b in json.loads(capsys.readouterr().out)["buckets"]} == {"free": 5, "exp": 4}
    assert await asyncio.to_thread(sluice, "bucket", "get", *base[:-1], "mac:1") == 2
    assert "client:" in capsys.readouterr().err
