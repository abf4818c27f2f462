"""The rate-limit response headers over real loopback HTTP: the draft RateLimit and
RateLimit-Policy as strict RFC 8941 Lists, the legacy ``X-RateLimit-*`` styles, an honest
Retry-After, and the 429 problem body naming policy, tier and rule."""

from __future__ import annotations

import random
import re
import time
from typing import Any

import aiohttp
import http_sfv
import pytest
from support.http_calls import (
    assert_problem,
    call,
)
from support.polling import wait_for
from support.sidecar_harness import (
    Factory,
    policy_doc,
)
from support.structured_fields import check_ratelimit_headers, members, parse_list


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
