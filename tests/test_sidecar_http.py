"""The sidecar over real loopback HTTP: wire headers, refusals, rules, proxying, bad input,
readiness and hot reload. An aiohttp upstream and the sidecar run in the test's event loop
(the 50 MiB streaming test runs the ``sluice sidecar`` command as a child process instead, so
that its memory can be measured on its own)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import re
import socket
import string
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import http_sfv
import psutil  # type: ignore[import-untyped]
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sluice_sidecar.server import StartupError
from sluice_sidecar.stores.memory import MemoryStore
from support.processes import SidecarProcess
from support.sidecar_harness import (
    UTF8_VALUE,
    Factory,
    RunningSidecar,
    Upstream,
    policy_doc,
    raw_request,
    wait_for,
    wait_stable,
    write_file,
)
from support.structured_fields import check_ratelimit_headers, members, parse_list

MiB = 1024 * 1024


def test_sf_parser_is_strict() -> None:
    ok = parse_list('"free";q=5;w=60, "exp";q=1;w=60')
    assert [(m.value, dict(m.params)) for m in ok] == [("free", {"q": 5, "w": 60}), ("exp", {"q": 1, "w": 60})]
    token = parse_list("free;q=5")[0]
    assert isinstance(token, http_sfv.Item) and isinstance(token.value, http_sfv.Token)
    for bad in ['"free";q=5,', '"free";Q=5', '"free";q=5;;w=1', '"free" ;q=5', '"fr\\ee"',
                '"free";q=1.', '"free";q=1234567890123456', '"free";q=5 "x"', '"free', ',"free"',
                '"free";q=5,,"x"', '"free";q=--1', '"fr\xe9e"', '"free";q=5,"x"']:
        with pytest.raises(ValueError):
            parse_list(bad)
    with pytest.raises(AssertionError):
        members("RateLimit", "free;r=1;t=0", ("r", "t"))  # a token, not a string
    with pytest.raises(ValueError):
        members("RateLimit", '"free";r=1;r=2;t=0', ("r", "t"))  # a duplicate parameter
    with pytest.raises(AssertionError):
        members("RateLimit", '"free";r=1;t=?0', ("r", "t"))  # a boolean, not an integer


# Fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


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


TRUST_LOCAL: dict[str, Any] = {"order": ["apiKey", "ip"], "trustedProxies": ["127.0.0.1/32"]}


# Headers --------------------------------------------------------------------------------------
async def test_draft_headers_are_rfc8941_lists_on_every_response(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(
        tiers=[{"name": "free", "requests": 4, "period": "10s"}],
        rules=[{"name": "search", "match": {"path": {"prefix": "/search"}},
                "limit": {"requests": 2, "period": "1m"}}],
        headers="draft"))
    seen = []
    for path in ["/a", "/search", "/search", "/search", "/b", "/c", "/d"]:
        r = await call(http, "GET", sc.url + path)
        got = check_ratelimit_headers(r.headers)
        assert not [h for h in r.headers if h.lower().startswith("x-ratelimit")]
        seen.append((path, r.status, got))
    tiers = [g["free"] for _, _, g in seen]
    assert all(t["q"] == 4 and t["w"] == 10 for t in tiers)
    # remaining counts down on allowed requests and is unchanged by refused ones
    assert [(s, g["free"]["r"]) for _, s, g in seen] == [
        (200, 3), (200, 2), (200, 1), (429, 1), (200, 0), (429, 0), (429, 0)]
    for _, status, g in seen:
        for v in g.values():  # t: 0 while quota is left, else when the next token is due
            assert (v["t"] == 0) if v["r"] > 0 else (1 <= v["t"] <= v["w"]), (status, g)
    search = [g for p, _, g in seen if p == "/search"]
    assert [list(g) for g in search] == [["free", "search"]] * 3
    assert [g["search"]["r"] for g in search] == [1, 0, 0]
    assert search[0]["search"]["q"] == 2 and search[0]["search"]["w"] == 60


@pytest.mark.parametrize("style", ["legacy", "both"])
async def test_legacy_headers(style: str, sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 3, "period": "1m"}], headers=style))
    remaining = []
    for _ in range(4):
        r = await call(http, "GET", sc.url + "/x")
        for h in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            values = r.headers.getall(h, [])
            assert len(values) == 1 and re.fullmatch(r"\d+", values[0]), (h, values)
        assert r.headers["X-RateLimit-Limit"] == "3"
        assert int(r.headers["X-RateLimit-Reset"]) <= 60
        remaining.append((r.status, int(r.headers["X-RateLimit-Remaining"])))
        if style == "both":
            check_ratelimit_headers(r.headers)
        else:
            assert "RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers
    assert remaining == [(200, 2), (200, 1), (200, 0), (429, 0)]


async def test_no_rate_headers_when_none_but_retry_after_on_429(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 1, "period": "1m"}], headers="none"))
    for expected in (200, 429):
        r = await call(http, "GET", sc.url + "/x")
        assert r.status == expected
        assert not [h for h in r.headers if "ratelimit" in h.lower()], dict(r.headers)
    assert re.fullmatch(r"[1-9]\d*", r.headers["Retry-After"])


async def test_retry_after_is_honest(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1s"}]))
    assert (await call(http, "GET", sc.url + "/")).status == 200
    assert (await call(http, "GET", sc.url + "/")).status == 200
    r = await call(http, "GET", sc.url + "/")
    refused_at = time.monotonic()
    body = assert_problem(r, 429)
    assert re.fullmatch(r"[1-9]\d*", r.headers["Retry-After"]), r.headers["Retry-After"]
    retry_after = int(r.headers["Retry-After"])
    assert check_ratelimit_headers(r.headers)["free"]["t"] == retry_after
    assert body["policy"] == "test-api" and body["tier"] == "free"

    async def allowed() -> float | None:
        resp = await call(http, "GET", sc.url + "/")
        return time.monotonic() - refused_at if resp.status == 200 else None

    waited = await wait_for(allowed, timeout=retry_after + 3, interval=0.02, what="a request to pass again")
    # Waiting Retry-After seconds is enough (a little slack for polling and scheduling), and it
    # is whole seconds rounded up, not more.
    assert retry_after - 1 - 0.05 <= waited <= retry_after + 0.25


def _window_s(limit: dict[str, Any]) -> int:
    """The refill time of a bucket from empty to full, whole seconds rounded up."""
    period = {"s": 1, "m": 60}[limit["period"][-1]] * int(limit["period"][:-1])
    burst = limit.get("burst", limit["requests"])
    return -(-burst * period // limit["requests"])


@pytest.mark.parametrize("tier", [
    {"name": "free", "requests": 2, "period": "1s", "burst": 7},  # burst above requests
    {"name": "free", "requests": 12, "period": "1m", "burst": 3},  # burst below requests
    {"name": "free", "requests": 3, "period": "1s"},  # burst = requests; EM not whole in µs
], ids=["burst>requests", "burst<requests", "burst=requests"])
async def test_ratelimit_never_reports_more_than_the_quota(tier: dict[str, Any], sidecars: Factory,
                                                           http: aiohttp.ClientSession) -> None:
    """Property-style: a seeded random walk over routes of cost 1, 2 and 3 (one with its own
    limit, burst above its rate). On every response each bucket's r <= q (q = its burst, w = the
    time it takes to refill from empty), t is 0 exactly when the bucket holds this request's
    cost, and on a 429 Retry-After is the largest t (the refusing bucket's wait); the legacy
    X-RateLimit-Limit is that q too."""
    own = {"requests": 1, "period": "1s", "burst": 3}
    rules = [{"name": "two", "match": {"path": {"exact": "/two"}}, "cost": 2},
             {"name": "three", "match": {"path": {"exact": "/three"}}, "cost": 3, "limit": own}]
    sc = await sidecars(policy_doc(tiers=[tier], rules=rules, headers="both"))
    cost = {"/one": 1, "/two": 2, "/three": 3}
    expected = {"free": (tier.get("burst", tier["requests"]), _window_s(tier)), "three": (3, 3)}
    rng = random.Random(8)
    seen: set[int] = set()
    deadline = time.monotonic() + 5  # bounded; the invariants hold at any instant
    for _ in range(120):
        if time.monotonic() > deadline:
            break
        path = rng.choice(list(cost))
        r = await call(http, "GET", sc.url + path)
        seen.add(r.status)
        got = check_ratelimit_headers(r.headers)
        for name, b in got.items():
            assert (b["q"], b["w"]) == expected[name], (path, got)
            assert b["r"] <= b["q"], (path, got)
            assert (b["t"] == 0) == (b["r"] >= cost[path]), (path, r.status, got)
        tightest = min(got.values(), key=lambda b: b["r"])
        assert r.headers["X-RateLimit-Limit"] == str(tightest["q"])
        assert int(r.headers["X-RateLimit-Remaining"]) <= tightest["q"]
        if r.status == 429:
            assert int(r.headers["Retry-After"]) == max(b["t"] for b in got.values()), (path, got)
            refusing = [b for b in got.values() if b["r"] < cost[path]]
            assert refusing and max(b["t"] for b in refusing) == int(r.headers["Retry-After"])
        else:
            assert r.status == 200 and "Retry-After" not in r.headers
    assert seen == {200, 429}


async def test_cost_two_refusal_t_is_retry_after(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    """The reported case: a cost-2 rule refused while one token is left said t=0 (or the next
    token's time) but Retry-After: the time for two. Waiting t seconds must be enough."""
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 1, "period": "1s", "burst": 3}],
                                   rules=[{"name": "two", "match": {"path": {"exact": "/two"}}, "cost": 2}]))
    assert (await call(http, "GET", sc.url + "/two")).status == 200
    r = await call(http, "GET", sc.url + "/two")
    assert r.status == 429
    got = check_ratelimit_headers(r.headers)["free"]
    assert got["q"] == 3 and got["w"] == 3 and got["r"] == 1
    assert got["t"] == int(r.headers["Retry-After"]) == 1


async def test_429_problem_names_policy_tier_and_rule(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(
        tiers=[{"name": "free", "requests": 100, "period": "1m"}],
        rules=[{"name": "expensive", "match": {"path": {"exact": "/api/expensive"}, "methods": ["POST"]},
                "limit": {"requests": 1, "period": "1m"}}]))
    assert (await call(http, "POST", sc.url + "/api/expensive")).status == 200
    r = await call(http, "POST", sc.url + "/api/expensive")
    body = assert_problem(r, 429)
    assert body["policy"] == "test-api" and body["tier"] == "free" and body["rule"] == "expensive"
    assert "expensive" in body["detail"]
    assert r.headers["Cache-Control"] == "no-store"


# API keys -------------------------------------------------------------------------------------
KEYS_POLICY: dict[str, Any] = dict(
    tiers=[{"name": "basic", "requests": 2, "period": "1m"}, {"name": "pro", "requests": 4, "period": "1m"}],
    defaultTier="basic", identify={"order": ["apiKey"]}, apiKeys={"required": True})


async def test_required_key_missing_or_unknown_is_401(sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(**KEYS_POLICY), keys={"sk-pro-1": "pro"})
    for headers in ({}, {"X-API-Key": "sk-unknown"}, {"X-API-Key": ""}, {"X-API-Key": "x" * 600}):
        r = await call(http, "GET", sc.url + "/x", headers=headers)
        body = assert_problem(r, 401)
        assert body["policy"] == "test-api"
        assert r.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key"'
        assert "sk-unknown" not in r.body.decode()
    assert upstream.seen == []


async def test_known_key_gets_its_tier(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(**KEYS_POLICY), keys={"sk-pro-1": "pro", "sk-basic-1": "basic"})
    for key, tier, q in (("sk-pro-1", "pro", 4), ("sk-basic-1", "basic", 2)):
        statuses = []
        for _ in range(q + 1):
            r = await call(http, "GET", sc.url + "/x", headers={"X-API-Key": key})
            statuses.append(r.status)
            assert check_ratelimit_headers(r.headers)[tier]["q"] == q
        assert statuses == [200] * q + [429]
        assert assert_problem(r, 429)["tier"] == tier


async def test_optional_keys_known_key_pro_anonymous_default(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(**{**KEYS_POLICY, "identify": {"order": ["apiKey", "ip"]}, "apiKeys": {}}),
                        keys={"sk-pro-1": "pro"})
    r = await call(http, "GET", sc.url + "/x", headers={"X-API-Key": "sk-pro-1"})
    assert r.status == 200 and list(check_ratelimit_headers(r.headers)) == ["pro"]
    r = await call(http, "GET", sc.url + "/x")
    assert r.status == 200 and list(check_ratelimit_headers(r.headers)) == ["basic"]


async def test_authorization_bearer(sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(**{**KEYS_POLICY, "apiKeys": {"header": "Authorization", "required": True}}),
                        keys={"sk-pro-1": "pro"})
    for value in ("Bearer sk-pro-1", "bearer   sk-pro-1 "):
        r = await call(http, "GET", sc.url + "/x", headers={"Authorization": value})
        assert r.status == 200, (value, r.body)
        assert list(check_ratelimit_headers(r.headers)) == ["pro"]
    for value in ("sk-pro-1", "Basic sk-pro-1", "Bearer ", "Bearer sk-pro-2"):
        r = await call(http, "GET", sc.url + "/x", headers={"Authorization": value})
        assert_problem(r, 401)
        assert r.headers["WWW-Authenticate"] == 'ApiKey header="Authorization"'
    assert (await call(http, "GET", sc.url + "/x")).status == 401


# Rules ----------------------------------------------------------------------------------------
RULES: list[dict[str, Any]] = [
    {"name": "health", "match": {"path": {"prefix": "/healthz"}}, "skip": True},
    {"name": "heavy", "match": {"path": {"exact": "/api/heavy"}}, "cost": 2},
    {"name": "expensive", "match": {"path": {"exact": "/api/expensive"}},
     "limit": {"requests": 1, "period": "1m"}},
]


async def test_skip_rule_is_never_limited(sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1m"}], rules=RULES))
    for _ in range(25):
        r = await call(http, "GET", sc.url + "/healthz/live")
        assert r.status == 200
        assert "RateLimit" not in r.headers
    assert len(upstream.seen) == 25
    # and skipped requests took nothing from the tier
    assert check_ratelimit_headers((await call(http, "GET", sc.url + "/x")).headers)["free"]["r"] == 1
    assert (await call(http, "GET", sc.url + "/x")).status == 200
    assert (await call(http, "GET", sc.url + "/x")).status == 429
    assert (await call(http, "GET", sc.url + "/healthz")).status == 200
    assert "skipped" in await metrics_text(http, sc)


async def test_cost_two_takes_two_tier_tokens(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 5, "period": "1m"}], rules=RULES))
    steps = []
    for path in ["/api/heavy", "/x", "/api/heavy", "/api/heavy", "/x", "/x"]:
        r = await call(http, "GET", sc.url + path)
        steps.append((r.status, check_ratelimit_headers(r.headers)["free"]["r"]))
    # 5 -> 3 -> 2 -> 0; then heavy needs 2 with 0 left, the plain request needs 1
    assert steps == [(200, 3), (200, 2), (200, 0), (429, 0), (429, 0), (429, 0)]


async def test_rule_limit_refuses_independently_of_the_tier(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}], rules=RULES))
    r = await call(http, "GET", sc.url + "/api/expensive")
    assert r.status == 200
    assert check_ratelimit_headers(r.headers) == {
        "free": {"q": 50, "w": 60, "r": 49, "t": 0}, "expensive": {"q": 1, "w": 60, "r": 0, "t": 60}}
    r = await call(http, "GET", sc.url + "/api/expensive")
    assert assert_problem(r, 429)["rule"] == "expensive"
    assert check_ratelimit_headers(r.headers)["free"]["r"] == 49  # the refusal took nothing
    for _ in range(3):
        assert (await call(http, "GET", sc.url + "/api/other")).status == 200


@pytest.mark.parametrize("spelling", ["//api/./expensive", "/api/x/../expensive", "/api//expensive",
                                      "/./api/expensive", "/api/x/%2e%2e/expensive", "/api/%65xpensive",
                                      "/api/x/y/../../expensive", "/../api/expensive"])
async def test_path_spellings_match_the_rule(spelling: str, sidecars: Factory, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}], rules=RULES))
    first = await raw_request(sc.data_port, f"GET {spelling} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert first is not None and first.status == 200
    assert "expensive" in (first.header("RateLimit") or ""), first.headers
    for path in (spelling, "/api/expensive"):
        r = await raw_request(sc.data_port, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert r is not None and r.status == 429 and r.json()["rule"] == "expensive"
    # the request itself was forwarded as spelled
    assert [s.raw_path for s in upstream.seen] == [spelling]


# Shadow mode and metrics ------------------------------------------------------------------------
async def test_shadow_mode_never_refuses_but_counts(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1m"}], mode="shadow"))
    for _ in range(6):
        r = await call(http, "GET", sc.url + "/x")
        assert r.status == 200
        assert "Retry-After" not in r.headers
    text = await metrics_text(http, sc)
    labels = {"policy": "test-api", "tier": "free"}
    assert metric(text, "sluice_decisions_total", decision="shadow_limited", **labels) == 4
    assert metric(text, "sluice_decisions_total", decision="allowed", **labels) == 2
    assert metric(text, "sluice_decisions_total", decision="limited") == 0


async def test_metrics_never_name_a_client(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    keys = {"sk-live-metrics-secret": "pro"}
    sc = await sidecars(policy_doc(**{**KEYS_POLICY, "identify": TRUST_LOCAL, "apiKeys": {}}), keys=keys)
    unknown = "sk-unknown-metrics-secret"
    for headers in ({"X-API-Key": "sk-live-metrics-secret"}, {"X-API-Key": unknown},
                    {"X-Forwarded-For": "198.51.100.23"}, {"X-Forwarded-For": "2001:db8::77"}, {}):
        for _ in range(6):
            await call(http, "GET", sc.url + "/x", headers=headers)
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_decisions_total", decision="limited") > 0  # it did count
    forbidden = ["127.0.0.1", "198.51.100.23", "2001:db8::77", "sk-live", "sk-unknown"]
    for k in (*keys, unknown):
        raw = hashlib.sha256(k.encode()).digest()
        forbidden += [raw.hex(), base64.urlsafe_b64encode(raw[:16]).rstrip(b"=").decode()]
    for f in forbidden:
        assert f not in text, f


# Proxying -------------------------------------------------------------------------------------
async def test_hop_by_hop_headers_are_not_forwarded(sidecars: Factory, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    req = (b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop-Custom\r\n"
           b"X-Hop-Custom: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
           b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n"
           b"X-End-To-End: kept\r\n\r\n")
    r = await raw_request(sc.data_port, req)
    assert r is not None and r.status == 200
    got = {k.lower() for k, _ in upstream.seen[-1].headers}
    for h in ("connection", "x-hop-custom", "keep-alive", "te", "upgrade", "proxy-authorization",
              "proxy-connection"):
        assert h not in got, (h, upstream.seen[-1].headers)
    assert upstream.seen[-1].header("X-End-To-End") == ["kept"]
    # and on the way back
    r = await raw_request(sc.data_port, b"GET /__hop HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r is not None and r.status == 200
    names = {k.lower() for k, _ in r.headers}
    for h in ("x-up-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert h not in names, (h, r.headers)
    assert "x-up-hop" not in (r.header("Connection") or "").lower()
    assert r.header("X-Up-End") == "kept"


async def test_forwarded_headers(sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    await call(http, "GET", sc.url + "/a")
    assert upstream.seen[-1].header("X-Forwarded-For") == ["127.0.0.1"]
    assert upstream.seen[-1].header("X-Forwarded-Proto") == ["http"]
    await call(http, "GET", sc.url + "/b", headers={"X-Forwarded-For": "203.0.113.7, 10.1.2.3"})
    assert upstream.seen[-1].header("X-Forwarded-For") == ["203.0.113.7, 10.1.2.3, 127.0.0.1"]


@pytest.mark.parametrize("target", [
    "/a%2Fb/c%20d/%7e/%E2%82%AC?x=1&y=%2F&z=a+b&x=2&empty=&flag",
    "/search?q=%22quoted%22&sort=-date&page=2&a[]=1&b=%zz",
    "/p;matrix=1/%252F?%3D=%26",
])
async def test_query_and_percent_encoding_forwarded_unchanged(target: str, sidecars: Factory, upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert r is not None and r.status == 200
    assert upstream.seen[-1].raw_path == target


@pytest.mark.parametrize("value", ["caf\u00e9".encode(), "\u20ac 5".encode(), b"caf\xe9", b"\x80\xff"])
async def test_header_bytes_forwarded_unchanged(value: bytes, sidecars: Factory, upstream: Upstream) -> None:
    """Header values are opaque octets (RFC 9110 5.5): UTF-8 or Latin-1 bytes reach the app as sent."""
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, b"GET /h HTTP/1.1\r\nHost: t\r\nX-Name: " + value + b"\r\n\r\n")
    assert r is not None and r.status == 200, r
    assert upstream.seen[-1].header("X-Name") == [value.decode("latin-1")]


async def test_response_header_bytes_relayed_unchanged(sidecars: Factory) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    r = await raw_request(sc.data_port, b"GET /__utf8 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r is not None and r.status == 200
    assert r.header("X-Utf8") == UTF8_VALUE.encode().decode("latin-1")


async def test_head_then_get_on_the_same_connections(sidecars: Factory, http: aiohttp.ClientSession,
                                                     upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    for path, size in (("/__stream/10", "10"), ("/__stream/100000", "100000"), ("/echo", None)):
        async with http.head(sc.url + path) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == size if size else r.headers["Content-Length"].isdigit()
            assert await r.read() == b""
        for i in range(3):  # the upstream connection was left clean: replies stay in step
            got = await call(http, "GET", f"{sc.url}/after-head-{i}")
            assert got.status == 200 and got.json()["raw_path"] == f"/after-head-{i}"


async def test_upstream_down_is_502(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sc = await sidecars(policy_doc(), upstream=f"http://127.0.0.1:{port}")
        r = await call(http, "GET", sc.url + "/x")
    assert_problem(r, 502)
    assert (await call(http, "GET", sc.admin_url + "/healthz")).status == 200


async def test_upstream_too_slow_is_504(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(), upstream_timeout_s=0.3)
    r = await call(http, "GET", sc.url + "/__sleep/30")
    assert_problem(r, 504)
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_upstream_errors_total", kind="timeout") == 1
    assert (await call(http, "GET", sc.url + "/fine")).status == 200


async def test_upstream_that_stops_reading_the_body_is_504(sidecars: Factory, upstream: Upstream) -> None:
    """An app that accepts the connection but never reads the upload is as stuck as one that
    never answers: the read timeout applies to sending the body too."""
    sc = await sidecars(policy_doc(), upstream_timeout_s=0.5, shutdown_timeout_s=1.0)
    size = 256 * MiB  # far more than the socket buffers on either side hold
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.data_port)

    async def upload() -> None:
        writer.write(b"POST /__stall/60 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * (256 * 1024)
        with contextlib.suppress(ConnectionError, OSError):
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()

    sender = asyncio.create_task(upload())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 15)
        assert status_line.startswith(b"HTTP/1.1 504 "), status_line
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    assert upstream.seen and upstream.seen[-1].raw_path == "/__stall/60"


async def test_absolute_form_never_reaches_another_host(sidecars: Factory, upstream: Upstream,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    decoy = await Upstream().start()
    try:
        sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
        # Watch every outgoing connection and name lookup this event loop makes.
        loop = asyncio.get_running_loop()
        connects: list[Any] = []
        lookups: list[Any] = []
        real_connect, real_lookup = loop.sock_connect, loop.getaddrinfo

        async def spy_connect(sock: socket.socket, address: Any) -> None:
            connects.append(address)
            await real_connect(sock, address)

        async def spy_lookup(host: Any, *a: Any, **kw: Any) -> Any:
            lookups.append(host)
            return await real_lookup(host, *a, **kw)

        monkeypatch.setattr(loop, "sock_connect", spy_connect)
        monkeypatch.setattr(loop, "getaddrinfo", spy_lookup)
        ok = await raw_request(sc.data_port, b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ok is not None and ok.status == 200
        # (the test's own raw connections to the sidecar go through this loop too)
        allowed = {("127.0.0.1", upstream.port), ("127.0.0.1", sc.data_port)}
        assert ("127.0.0.1", upstream.port) in {a[:2] for a in connects}, connects  # the spy works
        assert {a[:2] for a in connects} <= allowed, connects
        attacks = [
            b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"GET http://127.0.0.1:%d/steal HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy.port, decoy.port),
            b"GET https://evil.example:443/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (decoy.port, decoy.port),
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            b"GET @evil.example/ HTTP/1.1\r\nHost: t\r\n\r\n",
        ]
        for attack in attacks:
            r = await raw_request(sc.data_port, attack)
            assert r is None or r.status == 400 or 200 <= r.status < 300, (attack, r)
        assert decoy.seen == []
        for s in upstream.seen:
            assert s.raw_path.startswith("/"), s
            assert "evil" not in s.raw_path and "steal" not in s.raw_path, s
            assert not any("evil" in v for v in s.header("Host")), s
        assert {a[:2] for a in connects} <= allowed, connects
        assert all(h in ("127.0.0.1", b"127.0.0.1") for h in lookups), lookups
        ok = await raw_request(sc.data_port, b"GET /still-fine HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ok is not None and ok.status == 200
    finally:
        await decoy.close()


class RssSampler:
    """Peak resident memory of a process, sampled from /proc every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


async def _body(total: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    block = b"y" * chunk
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block[:n]
        sent += n


async def _transfer(http: aiohttp.ClientSession, url: str, size: int) -> None:
    async with http.post(url + "/upload", data=_body(size)) as r:
        assert r.status == 200
        assert (await r.json())["body_length"] == size
    for suffix in ("", "?chunked=1"):
        got = 0
        async with http.get(f"{url}/__stream/{size}{suffix}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
        assert got == size


@pytest.fixture
async def sidecar_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[SidecarProcess]:
    """The sidecar as a process of its own (so its RSS is its own), limits that never bind."""
    policy = tmp_path / "policy.yaml"
    write_file(policy, policy_doc(tiers=[{"name": "free", "requests": 1000, "period": "1s"}]))
    proc = await asyncio.to_thread(SidecarProcess, upstream.url, "--policy-file", str(policy),
                                   "--drain-s", "0", "--shutdown-timeout-s", "2")
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.close)


async def test_fifty_mib_both_ways_with_flat_memory(sidecar_process: SidecarProcess, upstream: Upstream,
                                                    http: aiohttp.ClientSession) -> None:
    proc = sidecar_process
    await _transfer(http, proc.url, 2 * MiB)  # warm up buffers and connection pools
    sampler = RssSampler(proc.proc.pid)
    baseline = sampler.rss()
    with sampler:
        await _transfer(http, proc.url, 50 * MiB)
    growth = sampler.peak - baseline
    assert growth < 20 * MiB, f"sidecar RSS grew by {growth / MiB:.1f} MiB for a 50 MiB body"
    assert upstream.seen[-3].body_length == 50 * MiB
    r = await call(http, "GET", proc.admin + "/healthz")
    assert r.status == 200


async def test_slow_client_and_slow_app_get_back_pressure(sidecar_process: SidecarProcess, upstream: Upstream,
                                                         http: aiohttp.ClientSession) -> None:
    """A client that stops reading stops the app's writes; an app that stops reading stops the
    client's upload: the sidecar holds neither body in memory meanwhile."""
    proc = sidecar_process
    total = 256 * MiB
    await _transfer(http, proc.url, 2 * MiB)
    sampler = RssSampler(proc.proc.pid)
    baseline = sampler.rss()
    with sampler:
        async with http.get(f"{proc.url}/__stream/{total}") as r:
            got = len(await r.content.readexactly(MiB))
            written = await wait_stable(lambda: upstream.stream_sent, what="bytes the app wrote")
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
        assert got == total

        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            block = b"u" * (256 * 1024)
            while sent < total:
                sent += len(block)
                yield block

        post = asyncio.create_task(call(http, "POST", proc.url + "/__gated", data=body()))
        accepted = await wait_stable(lambda: sent, what="bytes the client could send")
        upstream.gate.set()
        reply = await post
        assert reply.status == 200 and reply.json()["body_length"] == total
    # what is in flight is socket buffers (and the sidecar's bounded ones), not the body
    assert written < 64 * MiB, f"the app wrote {written / MiB:.0f} MiB to a client that read 1 MiB"
    assert accepted < 64 * MiB, f"the client sent {accepted / MiB:.0f} MiB to an app that read one chunk"
    growth = sampler.peak - baseline
    assert growth < 20 * MiB, f"sidecar RSS grew by {growth / MiB:.1f} MiB"


# Bad input ------------------------------------------------------------------------------------
GARBAGE = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
    b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n: no-name\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-" + b"n" * 9000 + b": v\r\n\r\n",
]


async def test_garbage_and_oversized_requests_get_4xx(sidecars: Factory, http: aiohttp.ClientSession,
                                                      upstream: Upstream) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 1000, "period": "1m"}]))
    for data in GARBAGE:
        r = await raw_request(sc.data_port, data)
        assert r is not None, data[:60]
        assert r.status in (400, 413, 414, 431), (data[:60], r.status)
    # a header of exactly the limit is still fine
    near = b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    r = await raw_request(sc.data_port, near)
    assert r is not None and r.status == 200
    assert [s.raw_path for s in upstream.seen] == ["/ok"]
    assert (await call(http, "GET", sc.admin_url + "/healthz")).status == 200
    assert (await call(http, "GET", sc.url + "/after")).status == 200


async def test_spoofed_xff_from_untrusted_peer_is_ignored(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1m"}],
                                   identify={"order": ["ip"], "trustedProxies": ["10.0.0.0/8"]}))
    assert [(await call(http, "GET", sc.url + "/")).status for _ in range(3)] == [200, 200, 429]
    for i in range(30):
        xff = random.choice([f"198.51.100.{i}", f"10.0.0.{i}", f"2001:db8::{i:x}", f"203.0.113.{i}, 10.0.0.1",
                             "garbage", "127.0.0.2"])
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": xff})
        assert r.status == 429, xff
    assert store_len(sc) == 1


async def test_xff_from_trusted_peer_names_the_client(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1m"}],
                                   identify={"order": ["ip"], "trustedProxies": ["127.0.0.1/32"]}))

    async def status(xff: str | None) -> int:
        headers = {"X-Forwarded-For": xff} if xff is not None else {}
        return (await call(http, "GET", sc.url + "/", headers=headers)).status

    assert [await status("198.51.100.1") for _ in range(3)] == [200, 200, 429]
    assert await status("198.51.100.2") == 200
    # the client cannot escape by prepending addresses: the rightmost untrusted hop counts
    assert await status("203.0.113.5, 198.51.100.1") == 429
    assert await status("198.51.100.1, 127.0.0.1") == 429
    assert await status(None) == 200  # the proxy itself is a client of its own
    assert store_len(sc) == 3


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_random_keys_against_required_keys_create_no_buckets(
        store: str, request: pytest.FixtureRequest, sidecars: Factory, http: aiohttp.ClientSession,
        upstream: Upstream) -> None:
    # a Redis of this test's own, so that DBSIZE counts this sidecar's buckets and nothing else
    redis = request.getfixturevalue("fresh_redis") if store == "redis" else None
    # a generous Redis timeout: a busy machine must not turn the final check into a fail-open
    sc = await sidecars(policy_doc(**KEYS_POLICY), keys={"sk-real": "pro"},
                        redis=redis.url if redis else None, redis_timeout_ms=5000)

    def count() -> int:
        return store_len(sc) if redis is None else int(redis.execute("DBSIZE"))

    before = count()
    statuses: dict[int, int] = {}

    async def worker(n: int) -> None:
        for _ in range(n):
            r = await call(http, "GET", sc.url + "/x", headers={"X-API-Key": rand_key()})
            statuses[r.status] = statuses.get(r.status, 0) + 1

    await asyncio.gather(*(worker(500) for _ in range(20)))
    assert statuses == {401: 10_000}
    assert before == 0 and count() == 0
    assert upstream.seen == []
    # the counting works: one real key makes one bucket
    assert (await call(http, "GET", sc.url + "/x", headers={"X-API-Key": "sk-real"})).status == 200
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_decisions_total", decision="allowed") == 1, text
    assert count() == 1


async def test_random_unknown_keys_share_the_anonymous_bucket(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 5000, "period": "1d"}]),
                        keys={"sk-real": "free"})
    remaining = []
    for _ in range(300):
        r = await call(http, "GET", sc.url + "/x", headers={"X-API-Key": rand_key()})
        assert r.status == 200
        remaining.append(check_ratelimit_headers(r.headers)["free"]["r"])
    assert remaining == list(range(4999, 4999 - 300, -1))  # one shared bucket
    assert store_len(sc) == 1


# Readiness and admin ------------------------------------------------------------------------------
async def test_readyz_before_config_then_loaded(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    # No policy file yet: only an explicit --without-config unlimited starts like this, and then
    # proxies unlimited (counted) while not ready.
    sc = await sidecars(None, without_config="unlimited")
    r = await call(http, "GET", sc.admin_url + "/readyz")
    assert r.status == 503 and r.json()["ready"] is False
    assert (await call(http, "GET", sc.admin_url + "/healthz")).status == 200
    assert [(await call(http, "GET", sc.url + "/x")).status for _ in range(7)] == [200] * 7
    assert metric(await metrics_text(http, sc), "sluice_decisions_total", decision="unconfigured") == 7
    sc.write_policy(policy_doc())

    async def ready() -> bool:
        return (await call(http, "GET", sc.admin_url + "/readyz")).status == 200

    await wait_for(ready, timeout=10, what="/readyz to turn 200 after the policy appeared")
    body = (await call(http, "GET", sc.admin_url + "/readyz")).json()
    assert body["ready"] is True and body["config"]["loaded"] is True


async def test_invalid_policy_at_start_refuses_to_start_or_serves_unready(
        sidecars: Factory, http: aiohttp.ClientSession) -> None:
    bad = policy_doc(tiers=[{"name": "free", "requests": -5, "period": "1m"}])
    with pytest.raises(StartupError, match=r"^--policy-file: .*spec\.tiers\[0\]\.requests"):
        await sidecars(bad)
    sc = await sidecars(bad, without_config="unlimited")
    r = await call(http, "GET", sc.admin_url + "/readyz")
    assert r.status == 503 and r.json()["config"]["loaded"] is False


async def test_readyz_503_while_draining(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(), drain_s=0.4)
    assert (await call(http, "GET", sc.admin_url + "/readyz")).status == 200
    task = asyncio.create_task(sc.sidecar.drain())
    try:
        async def not_ready() -> bool:
            return (await call(http, "GET", sc.admin_url + "/readyz")).status == 503

        await wait_for(not_ready, timeout=5, interval=0.01, what="/readyz to turn 503 on drain")
        assert (await call(http, "GET", sc.admin_url + "/readyz")).json()["draining"] is True
        assert (await call(http, "GET", sc.url + "/still-served")).status == 200
        await asyncio.wait_for(task, 10)
    finally:
        sc.stopped = True
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sc.sidecar.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", sc.url + "/after-drain")


async def test_readyz_names_policies_and_admin_config_adds_their_manifests(
        sidecars: Factory, http: aiohttp.ClientSession) -> None:
    """One key, one meaning: a policy's name is under ``policyRef`` / ``clusterPolicyRef``;
    ``policy`` / ``clusterPolicy`` are always manifests (only /admin/config has them)."""
    sc = await sidecars(policy_doc())
    ready = (await call(http, "GET", sc.admin_url + "/readyz")).json()["config"]
    assert ready["policyRef"] == "default/test-api" and ready["clusterPolicyRef"] is None
    assert "policy" not in ready and "clusterPolicy" not in ready
    body = (await call(http, "GET", sc.admin_url + "/admin/config")).json()
    assert body["config"] == ready
    assert body["policy"]["kind"] == "RateLimitPolicy" and "clusterPolicy" not in body


async def test_admin_config_counts_keys_and_shows_no_key_material(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    hashed = "sk-stored-as-digest"
    keys = {"sk-alpha-123": "pro", "sk-beta-456": "basic",
            "sha256:" + hashlib.sha256(hashed.encode()).hexdigest(): {"tier": "pro"}}
    sc = await sidecars(policy_doc(**KEYS_POLICY), keys=keys)
    r = await call(http, "GET", sc.admin_url + "/admin/config")
    assert r.status == 200
    body = r.json()
    assert body["apiKeys"] == 3
    assert body["policy"]["metadata"]["name"] == "test-api"
    assert [t["name"] for t in body["policy"]["spec"]["tiers"]] == ["basic", "pro"]
    text = r.body.decode()
    for k in ("sk-alpha-123", "sk-beta-456", hashed):
        raw = hashlib.sha256(k.encode()).digest()
        for form in (k, raw.hex(), base64.urlsafe_b64encode(raw[:16]).rstrip(b"=").decode()):
            assert form not in text
    assert "sk-" not in text and "sha256" not in text


# Hot reload -----------------------------------------------------------------------------------
async def _client_quota(http: aiohttp.ClientSession, sc: RunningSidecar, client: str) -> list[int]:
    """Statuses of requests from a fresh client (via X-Forwarded-For) until its first 429."""
    statuses = []
    for _ in range(50):
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": client})
        statuses.append(r.status)
        if r.status == 429:
            break
    return statuses


async def test_hot_reload_applies_a_new_limit(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 3, "period": "1m"}], identify=TRUST_LOCAL))
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 3 + [429]
    sc.write_policy(policy_doc(tiers=[{"name": "free", "requests": 7, "period": "1m"}], identify=TRUST_LOCAL))

    async def reloaded() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.250"})
        return check_ratelimit_headers(r.headers)["free"]["q"] == 7

    await wait_for(reloaded, timeout=10, interval=0.1, what="the new limit to apply")
    assert await _client_quota(http, sc, "198.51.100.2") == [200] * 7 + [429]
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_config_reloads_total", result="ok") == 2


async def test_buckets_reset_only_when_their_limit_changes(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    """A config change keeps every bucket, except the buckets whose limit changed: those start
    full under the new limit (nothing used or refused under the old one carries over)."""
    tiers = [{"name": "free", "requests": 3, "period": "1m"}]
    sc = await sidecars(policy_doc(tiers=tiers, identify=TRUST_LOCAL))
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 3 + [429]
    # Same limit, other changes (header style, a new rule): the used-up bucket stays used up.
    sc.write_policy(policy_doc(tiers=tiers, identify=TRUST_LOCAL, headers="both",
                               rules=[{"name": "other", "match": {"path": {"prefix": "/other"}}, "cost": 2}]))

    async def legacy_headers() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.250"})
        return "X-RateLimit-Limit" in r.headers

    await wait_for(legacy_headers, timeout=10, interval=0.1, what="the header change to apply")
    assert await _client_quota(http, sc, "198.51.100.1") == [429]
    # The tier's limit changes: a full bucket of the new size, for this client too.
    sc.write_policy(policy_doc(tiers=[{"name": "free", "requests": 5, "period": "1m"}], identify=TRUST_LOCAL))

    async def reloaded() -> bool:
        r = await call(http, "GET", sc.url + "/", headers={"X-Forwarded-For": "198.51.100.251"})
        return check_ratelimit_headers(r.headers)["free"]["q"] == 5

    await wait_for(reloaded, timeout=10, interval=0.1, what="the new limit to apply")
    assert await _client_quota(http, sc, "198.51.100.1") == [200] * 5 + [429]


async def test_invalid_policy_keeps_the_last_good_one(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    good = policy_doc(tiers=[{"name": "free", "requests": 3, "period": "1m"}], identify=TRUST_LOCAL)
    sc = await sidecars(good)
    version = (await call(http, "GET", sc.admin_url + "/admin/config")).json()["config"]["version"]
    broken: list[Any] = [policy_doc(tiers=[{"name": "free", "requests": -1, "period": "1m"}]),
              "apiVersion: [unclosed\n  ::: not yaml"]
    for n, bad in enumerate(broken, start=1):
        sc.write_policy(bad)

        async def counted(n: int = n) -> bool:
            text = await metrics_text(http, sc)
            return metric(text, "sluice_config_reloads_total", result="invalid") >= n

        await wait_for(counted, timeout=10, interval=0.1, what="the invalid reload to be counted")
        assert await _client_quota(http, sc, f"198.51.100.{n}") == [200] * 3 + [429]
        assert (await call(http, "GET", sc.admin_url + "/readyz")).status == 200
        cfg = (await call(http, "GET", sc.admin_url + "/admin/config")).json()
        assert cfg["config"]["version"] == version
    text = await metrics_text(http, sc)
    assert metric(text, "sluice_config_reloads_total", result="invalid") == 2
    assert metric(text, "sluice_config_reloads_total", result="ok") == 1


async def test_forwarded_proto_only_from_trusted_proxies(sidecars: Factory, http: aiohttp.ClientSession,
                                                         upstream: Upstream) -> None:
    untrusted = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    await call(http, "GET", untrusted.url + "/a", headers={"X-Forwarded-Proto": "https"})
    assert upstream.seen[-1].header("X-Forwarded-Proto") == ["http"]  # a client cannot claim https
    trusted = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}],
                                        identify={"order": ["ip"], "trustedProxies": ["127.0.0.1/32"]}))
    await call(http, "GET", trusted.url + "/b", headers={"X-Forwarded-Proto": "https"})
    assert upstream.seen[-1].header("X-Forwarded-Proto") == ["https"]  # a trusted ingress can


PROXY_HEADERS = {"Forwarded": "for=203.0.113.9;host=evil.example;proto=https",
                 "X-Real-IP": "203.0.113.9", "X-Forwarded-Host": "evil.example"}


async def test_proxy_headers_reach_the_app_only_from_trusted_proxies(
        sidecars: Factory, http: aiohttp.ClientSession, upstream: Upstream) -> None:
    """``Forwarded``, ``X-Real-IP`` and ``X-Forwarded-Host`` name the client, its host and
    scheme: a client could forge them to an app that reads them. They are dropped unless the
    peer is a trusted proxy of the policy, which may set them."""
    tiers = [{"name": "free", "requests": 50, "period": "1m"}]
    untrusted = await sidecars(policy_doc(tiers=tiers))
    await call(http, "GET", untrusted.url + "/a", headers=PROXY_HEADERS)
    seen = upstream.seen[-1]
    assert {name: seen.header(name) for name in PROXY_HEADERS} == {name: [] for name in PROXY_HEADERS}
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    trusted = await sidecars(policy_doc(tiers=tiers, identify={"order": ["ip"],
                                                               "trustedProxies": ["127.0.0.1/32"]}))
    await call(http, "GET", trusted.url + "/b", headers=PROXY_HEADERS)
    seen = upstream.seen[-1]
    assert {name: seen.header(name) for name in PROXY_HEADERS} == {k: [v] for k, v in PROXY_HEADERS.items()}


async def test_expect_100_continue_is_answered_only_when_allowed(sidecars: Factory) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 1, "period": "1h"}]))
    head = (b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.data_port)
    try:
        writer.write(head)
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    # Over the limit: the 429 comes straight away, no invitation to send the body.
    r = await raw_request(sc.data_port, head)
    assert r is not None
    assert r.status == 429


async def test_refused_targets_take_no_token(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 2, "period": "1h"}]))
    for _ in range(5):
        r = await raw_request(sc.data_port, b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        assert r is not None
        assert r.status == 400
    assert [(await call(http, "GET", sc.url + "/")).status for _ in range(3)] == [200, 200, 429]


async def test_unparseable_requests_are_terse_and_counted(sidecars: Factory, http: aiohttp.ClientSession,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    sc = await sidecars(policy_doc(tiers=[{"name": "free", "requests": 50, "period": "1m"}]))
    secret = b"SECRET-TOKEN-IN-A-BAD-LINE"
    with caplog.at_level("INFO"):
        r = await raw_request(sc.data_port, b"GET /x " + secret + b"\x00 HTTP/9.9\r\n\r\n")
    assert r is not None
    assert r.status == 400
    assert r.header("Content-Type") == "application/problem+json"
    assert secret not in r.body  # nothing of the request is echoed
    assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "WARNING")]
    assert metric(await metrics_text(http, sc), "sluice_bad_requests_total") == 1
