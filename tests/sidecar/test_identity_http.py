"""Client identity through a real sidecar on loopback, for what a hostile client sends: headers
repeated as several field lines (written on raw sockets, which HTTP client libraries merge or
refuse) and identity headers from peers that may not set them.

Every client here connects from 127.0.0.1; whether that peer is trusted is the policy's choice
(``trustedProxies: [127.0.0.1/32]`` makes it a trusted proxy, ``[10.0.0.0/8]`` does not).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sluice_sidecar.stores.memory import MemoryStore
from support.sidecar_harness import (
    Factory,
    RawResponse,
    RunningSidecar,
    Upstream,
    policy_doc,
    raw_request,
)

FREE_5 = [{"name": "free", "requests": 5, "period": "1m", "burst": 5}]
TRUST_LOCAL = ["127.0.0.1/32"]
TRUST_OTHER = ["10.0.0.0/8"]  # a real proxy range: 127.0.0.1 is then an untrusted client


async def get(sc: RunningSidecar, *lines: str, path: str = "/") -> RawResponse:
    """GET ``path`` with these header lines, each written as its own field line."""
    head = "".join(f"{line}\r\n" for line in lines)
    data = f"GET {path} HTTP/1.1\r\nHost: sluice.test\r\n{head}Connection: close\r\n\r\n".encode()
    r = await raw_request(sc.data_port, data)
    assert r is not None, "the sidecar closed the connection without answering"
    return r


def buckets(sc: RunningSidecar) -> int:
    store = sc.sidecar.store
    assert isinstance(store, MemoryStore)
    return len(store)


def tier_of(r: RawResponse) -> str:
    """The tier named by the first member of RateLimit-Policy."""
    value = r.header("RateLimit-Policy")
    assert value, r.headers
    return value.split(";")[0].strip('"')


# X-Forwarded-For sent as several field lines ------------------------------------------------------
async def test_forged_xff_lines_before_the_proxys_own_line_do_not_escape_the_ip_limit(
        sidecars: Factory, upstream: Upstream) -> None:
    """A trusted proxy at 127.0.0.1 that appends its own X-Forwarded-For line (HAProxy's
    ``option forwardfor``) after the client's forged ones: the client is its real address."""
    sc = await sidecars(policy_doc(tiers=FREE_5, identify={"order": ["ip"], "trustedProxies": TRUST_LOCAL}))
    statuses = []
    for i in range(6):
        forged = [f"X-Forwarded-For: 203.0.113.{i}", f"X-Forwarded-For: 192.0.2.{i}, 10.9.{i}.1"][: 1 + i % 2]
        r = await get(sc, *forged, "X-Forwarded-For: 198.51.100.7")
        statuses.append(r.status)
    assert statuses == [200] * 5 + [429]
    # walked exactly as forwarded: the app gets every line comma-joined in order, then the peer
    assert upstream.seen[0].header("X-Forwarded-For") == ["203.0.113.0, 198.51.100.7, 127.0.0.1"]
    assert upstream.seen[1].header("X-Forwarded-For") == [
        "203.0.113.1, 192.0.2.1, 10.9.1.1, 198.51.100.7, 127.0.0.1"]
    # another real client behind the same proxy has a bucket of its own
    assert (await get(sc, "X-Forwarded-For: 203.0.113.9", "X-Forwarded-For: 198.51.100.8")).status == 200
    assert buckets(sc) == 2


# Single-valued headers sent as several field lines ------------------------------------------------
KEYED = {"tiers": [{"name": "free", "requests": 5, "period": "1m"}, {"name": "pro", "requests": 50, "period": "1m"}],
         "defaultTier": "free"}


@pytest.mark.parametrize(("header", "value"), [("X-API-Key", "sk-pro-1"), ("Authorization", "Bearer sk-pro-1")])
async def test_a_repeated_api_key_header_counts_as_absent(header: str, value: str, sidecars: Factory,
                                                          upstream: Upstream) -> None:
    """Which of two keys would the app read? Sluice picks neither: no key, so 401 when keys are
    required and the anonymous default tier otherwise; never the client's choice of one."""
    required = await sidecars(policy_doc(name="required", apiKeys={"header": header, "required": True},
                                         identify={"order": ["apiKey"]}, **KEYED), keys={"sk-pro-1": "pro"})
    assert (await get(required, f"{header}: {value}")).status == 200
    for other in (value, f"{value}x", ""):
        for lines in ([f"{header}: {value}", f"{header}: {other}"], [f"{header}: {other}", f"{header}: {value}"]):
            r = await get(required, *lines)
            assert r.status == 401, lines
    assert len(upstream.seen) == 1

    optional = await sidecars(policy_doc(name="optional", apiKeys={"header": header}, **KEYED),
                              keys={"sk-pro-1": "pro"})
    assert tier_of(await get(optional, f"{header}: {value}")) == "pro"
    statuses = []
    for i in range(6):
        r = await get(optional, f"{header}: {value}", f"{header}: {value}{i}")
        statuses.append(r.status)
        assert r.status == 429 or tier_of(r) == "free"
    assert statuses == [200] * 5 + [429]  # the anonymous bucket of 127.0.0.1


# The header identity source: believed only from the peers allowed to set it ------------------------
def header_policy(**identify: Any) -> dict[str, Any]:
    return policy_doc(tiers=FREE_5, identify={"order": ["header", "ip"], "header": "X-User-Id", **identify})


async def statuses_with_rotating_ids(sc: RunningSidecar, n: int, *extra: str) -> list[int]:
    return [(await get(sc, f"X-User-Id: user-{uuid.uuid4().hex}", *extra)).status for _ in range(n)]


@pytest.mark.parametrize("identify", [{"trustedProxies": TRUST_OTHER}, {},
                                      {"trustedProxies": TRUST_OTHER, "headerFrom": "trustedProxies"}],
                         ids=["other-proxies", "no-proxies", "explicit-default"])
async def test_identity_header_from_an_untrusted_peer_is_ignored(identify: dict[str, Any],
                                                                 sidecars: Factory) -> None:
    sc = await sidecars(header_policy(**identify))
    assert await statuses_with_rotating_ids(sc, 6) == [200] * 5 + [429]
    assert buckets(sc) == 1  # the peer's IP: the next source in identify.order


@pytest.mark.parametrize("identify", [{"trustedProxies": TRUST_LOCAL}, {"headerFrom": "trustedProxiesOrLoopback"},
                                      {"trustedProxies": TRUST_OTHER, "headerFrom": "trustedProxiesOrLoopback"}],
                         ids=["trusted-proxy", "loopback", "loopback-and-proxies"])
async def test_identity_header_from_an_allowed_peer_names_the_client(identify: dict[str, Any],
                                                                     sidecars: Factory) -> None:
    sc = await sidecars(header_policy(**identify))
    assert await statuses_with_rotating_ids(sc, 20) == [200] * 20
    assert buckets(sc) == 20
    same = [(await get(sc, "X-User-Id: alice")).status for _ in range(6)]
    assert same == [200] * 5 + [429]


async def test_a_repeated_identity_header_counts_as_absent(sidecars: Factory) -> None:
    """Even from a trusted proxy: one that appends instead of replacing leaves two lines, and
    the client's own line must not choose the bucket."""
    sc = await sidecars(header_policy(trustedProxies=TRUST_LOCAL))
    assert await statuses_with_rotating_ids(sc, 6, "X-User-Id: set-by-the-proxy") == [200] * 5 + [429]
    assert buckets(sc) == 1


# IPv6 clients ----------------------------------------------------------------------------------
async def test_addresses_of_one_ipv6_slash_64_share_one_bucket(sidecars: Factory) -> None:
    """Behind a trusted proxy, a client that rotates through its /64 (2^64 addresses) is one
    client: its sixth request is refused; a client of another /64 has a bucket of its own."""
    sc = await sidecars(policy_doc(tiers=FREE_5, identify={"order": ["ip"], "trustedProxies": TRUST_LOCAL}))
    statuses = [(await get(sc, f"X-Forwarded-For: 2001:db8:1:2:{i:x}::{i + 1:x}")).status for i in range(6)]
    assert statuses == [200] * 5 + [429]
    assert (await get(sc, "X-Forwarded-For: 2001:db8:1:3::1")).status == 200
    assert buckets(sc) == 2
