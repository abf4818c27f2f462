"""Who pays and what is limited, over real loopback HTTP: required and optional API keys and
their tiers, ``Authorization: Bearer``, rules (skip, cost, their own limits, path spellings),
shadow mode, and metrics that never name a client."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import aiohttp
import pytest
from support.http_calls import (
    KEYS_POLICY,
    TRUST_LOCAL,
    assert_problem,
    call,
    metric,
    metrics_text,
)
from support.sidecar_harness import (
    Factory,
    Upstream,
    policy_doc,
    raw_request,
)
from support.structured_fields import check_ratelimit_headers

# API keys -------------------------------------------------------------------------------------


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
