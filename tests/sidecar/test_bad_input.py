"""Hostile and malformed requests through a real sidecar on loopback: garbage and oversized
requests, spoofed X-Forwarded-For, random API keys that must create no buckets, proxy headers
believed only from trusted proxies, ``Expect: 100-continue``, refused targets and terse,
counted parse errors."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest
from support.http_calls import (
    KEYS_POLICY,
    call,
    metric,
    metrics_text,
    rand_key,
    store_len,
)
from support.sidecar_harness import (
    Factory,
    Upstream,
    policy_doc,
    raw_request,
)
from support.structured_fields import check_ratelimit_headers

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
                        redis=redis.url if redis else None, redis_timeout_ms=5000,
                        usage="off")  # DBSIZE: buckets only, not the usage stream

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
