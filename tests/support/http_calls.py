"""Calls to a sidecar under test over real HTTP, and what the sidecar tests read back: the
reply, a metric's value, the in-memory store's size, an RFC 9457 problem body."""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from sluice_sidecar.stores.memory import MemoryStore

from support.sidecar_harness import RunningSidecar

TRUST_LOCAL: dict[str, Any] = {"order": ["apiKey", "ip"], "trustedProxies": ["127.0.0.1/32"]}
"""An identify block that believes X-Forwarded-For from the loopback (the tests' own proxy)."""

KEYS_POLICY: dict[str, Any] = dict(
    tiers=[{"name": "basic", "requests": 2, "period": "1m"}, {"name": "pro", "requests": 4, "period": "1m"}],
    defaultTier="basic", identify={"order": ["apiKey"]}, apiKeys={"required": True})
"""Two tiers, API keys required: ``sidecars(policy_doc(**KEYS_POLICY), keys={...})``."""


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Reply:
    async with http.request(method, url, **kw) as r:
        return Reply(r.status, r.headers, await r.read())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def metrics_text(http: aiohttp.ClientSession, sc: RunningSidecar) -> str:
    r = await call(http, "GET", sc.admin_url + "/metrics")
    assert r.status == 200
    return r.body.decode()


def store_len(sc: RunningSidecar) -> int:
    store = sc.sidecar.store
    assert isinstance(store, MemoryStore)
    return len(store)


def rand_key(n: int = 24) -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=n))


def assert_problem(r: Reply, status: int) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body)
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body
