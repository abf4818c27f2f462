"""Unit tests for ``sluice_sidecar.identify``: who the client is, given the TCP peer,
X-Forwarded-For and the trusted proxies, and which peers may set the identity header. Whoever
is not a trusted proxy cannot choose its identity by sending headers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from sluice_core.errors import PolicyErrors
from sluice_core.keyschema import client_for_header, client_for_ip, ip_group
from sluice_core.manifest import to_manifest
from sluice_core.model import HeaderFrom, Identify, Source
from sluice_core.parse import parse_policy
from sluice_sidecar.identify import (
    MAX_XFF_HOPS,
    PeerTrust,
    anonymous_client,
    client_ip,
    header_trusted,
    is_trusted,
    list_field,
    single_field,
)

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"),
           ipaddress.ip_network("127.0.0.1/32"))


def trusted(ip: str) -> bool:
    return any(ipaddress.ip_address(ip) in net for net in TRUSTED)


def canon(ip: str) -> str:
    """The one spelling of an address; an IPv4-mapped IPv6 address is its IPv4 address."""
    addr = ipaddress.ip_address(ip)
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return str(mapped or addr)


any_ip = st.ip_addresses().map(str)
untrusted_ip = any_ip.filter(lambda ip: not trusted(ip))
trusted_ip = st.one_of(
    st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n))),
    st.integers(0, 2**120 - 1).map(lambda n: str(ipaddress.IPv6Address((0xFD << 120) + n))),
    st.just("127.0.0.1"),
)
# What a client may write into X-Forwarded-For: anything but a comma is one entry.
xff_entry = st.one_of(any_ip, trusted_ip, st.text(st.characters(blacklist_characters=",\r\n"), max_size=40))
GARBAGE = ["garbage", "unknown", "", " ", "1.2.3.4:80", "[2001:db8::1]", "1.2.3", "999.1.1.1",
           "_hidden", "10.0.0.1/8", "0x0a000001", "1.2.3.4 5.6.7.8", "for=1.2.3.4", "::g"]


# The peer is not a trusted proxy -----------------------------------------------------------------
@given(peer=untrusted_ip, xff=st.lists(xff_entry, max_size=10).map(", ".join))
def test_untrusted_peer_is_the_client_whatever_xff_says(peer: str, xff: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == peer


@given(peer=any_ip, xff=st.lists(xff_entry, max_size=10).map(", ".join))
def test_no_trusted_proxies_means_the_peer(peer: str, xff: str) -> None:
    assert client_ip(peer, xff, ()) == peer


@pytest.mark.parametrize("xff", [None, ""])
def test_trusted_peer_without_xff_is_the_client(xff: str | None) -> None:
    assert client_ip("10.0.0.1", xff, TRUSTED) == "10.0.0.1"


# Walking a trusted chain ---------------------------------------------------------------------
@pytest.mark.parametrize(("peer", "xff", "expected"), [
    ("10.0.0.1", "198.51.100.7", "198.51.100.7"),
    ("10.0.0.1", "198.51.100.7, 10.0.0.2, 10.0.0.3", "198.51.100.7"),
    # the client prepends a spoofed address: the rightmost untrusted entry wins
    ("10.0.0.1", "203.0.113.66, 198.51.100.7, 10.0.0.2", "198.51.100.7"),
    ("10.0.0.1", "10.9.9.9, 203.0.113.66, 198.51.100.7", "198.51.100.7"),
    ("127.0.0.1", "198.51.100.7,10.0.0.2", "198.51.100.7"),  # no spaces
    ("127.0.0.1", "  198.51.100.7 ,\t10.0.0.2  ", "198.51.100.7"),
    # every hop trusted: the leftmost one walked is the client
    ("10.0.0.1", "10.0.0.5, 10.0.0.2", "10.0.0.5"),
])
def test_trusted_chain_is_walked_right_to_left(peer: str, xff: str, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


@given(spoofed=st.lists(xff_entry, max_size=5), client=untrusted_ip,
       proxies=st.lists(trusted_ip, min_size=1, max_size=MAX_XFF_HOPS))
def test_the_address_seen_by_the_first_trusted_proxy_is_the_client(
        spoofed: list[str], client: str, proxies: list[str]) -> None:
    """client -> proxies[0] -> ... -> proxies[-1] -> sidecar: each proxy appends the address it
    saw, so X-Forwarded-For is ``spoofed..., client, proxies[0..-2]`` and the peer is proxies[-1].
    Whatever the client wrote (``spoofed``) is to the left and never read."""
    xff = ", ".join([*spoofed, client, *proxies[:-1]])
    assert client_ip(proxies[-1], xff, TRUSTED) == canon(client)


# Garbage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_entry_stops_the_walk_at_the_last_good_hop(garbage: str) -> None:
    assert client_ip("10.0.0.1", f"198.51.100.7, {garbage}, 10.0.0.2", TRUSTED) == "10.0.0.2"
    assert client_ip("10.0.0.1", f"198.51.100.7, {garbage}", TRUSTED) == "10.0.0.1"
    assert client_ip("10.0.0.1", garbage, TRUSTED) == "10.0.0.1"


@given(peer=st.one_of(any_ip, trusted_ip), entries=st.lists(xff_entry, max_size=50))
def test_the_answer_is_always_the_peer_or_a_canonical_recent_hop(peer: str, entries: list[str]) -> None:
    got = client_ip(peer, ", ".join(entries), TRUSTED)
    recent = {canon(e.strip()) for e in entries[-MAX_XFF_HOPS:] if _is_ip(e.strip())}
    assert got == peer or got in recent
    if got != peer:
        assert got == canon(got)  # one client, one spelling: no fresh bucket per spelling


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def test_peer_that_is_not_an_ip_is_never_trusted() -> None:
    assert client_ip("not-an-ip", "198.51.100.7", TRUSTED) == "not-an-ip"


# IPv6 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("peer", "xff", "expected"), [
    ("fd00::1", "2001:db8::1", "2001:db8::1"),
    ("fd00::1", "2001:db8::1, fd00::2, 10.0.0.3", "2001:db8::1"),
    ("10.0.0.1", "2001:DB8:0:0:0:0:0:1, fd00::2", "2001:db8::1"),  # canonical spelling
    ("fd00::1", "198.51.100.7", "198.51.100.7"),
    ("2001:db8::99", "2001:db8::1", "2001:db8::99"),  # untrusted v6 peer
])
def test_ipv6(peer: str, xff: str, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


@given(v6=st.ip_addresses(v=6).filter(lambda a: not trusted(str(a))))
def test_ipv6_spellings_are_one_client(v6: ipaddress.IPv6Address) -> None:
    spellings = {str(v6), v6.exploded, v6.exploded.upper()}
    # an IPv4-mapped address is its IPv4 address
    assert {client_ip("fd00::1", s, TRUSTED) for s in spellings} == {str(v6.ipv4_mapped or v6)}


# Long headers ---------------------------------------------------------------------------------
def test_long_xff_is_walked_at_most_max_hops() -> None:
    chain = [f"10.0.{i // 256}.{i % 256}" for i in range(10_000)]
    # the untrusted client lies beyond the bound: the walk stops at the last hop it may read
    got = client_ip("10.255.255.255", ", ".join(["198.51.100.7", *chain]), TRUSTED)
    assert got == chain[-MAX_XFF_HOPS]
    # exactly at the bound it is still found
    got = client_ip("10.255.255.255", ", ".join(["198.51.100.7", *chain[-(MAX_XFF_HOPS - 1):]]), TRUSTED)
    assert got == "198.51.100.7"


def test_long_xff_is_not_parsed_entry_by_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the last MAX_XFF_HOPS entries are looked at, however long the header."""
    calls = 0
    real = ipaddress.ip_address

    def counting(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        nonlocal calls
        calls += 1
        return real(text)

    monkeypatch.setattr(ipaddress, "ip_address", counting)  # the module identify uses
    xff = ", ".join(["10.1.1.1"] * 100_000)
    assert client_ip("10.0.0.1", xff, TRUSTED) == "10.1.1.1"
    assert 0 < calls <= 3 * MAX_XFF_HOPS, calls


# Field lines and who may set the identity header ---------------------------------------------------
def test_list_field_joins_every_line_in_order_and_single_field_refuses_repeats() -> None:

    h = CIMultiDictProxy(CIMultiDict([("X-Forwarded-For", "203.0.113.5"), ("x-api-key", "k"),
                                      ("x-forwarded-for", "198.51.100.7, 10.0.0.2")]))
    assert list_field(h, "X-Forwarded-For") == "203.0.113.5, 198.51.100.7, 10.0.0.2"
    assert client_ip("10.0.0.1", list_field(h, "X-Forwarded-For"), TRUSTED) == "198.51.100.7"
    assert list_field(h, "Forwarded") is None
    assert single_field(h, "X-API-Key") == "k"
    assert single_field(h, "X-Forwarded-For") is None  # two lines: ambiguous
    assert single_field(h, "X-User-Id") is None


@pytest.mark.parametrize(("peer", "header_from", "trusted_proxies", "believed"), [
    ("127.0.0.1", "trustedProxies", (), False),
    ("127.0.0.1", "trustedProxies", ("127.0.0.1/32",), True),
    ("10.1.2.3", "trustedProxies", ("10.0.0.0/8",), True),
    ("198.51.100.7", "trustedProxies", ("10.0.0.0/8",), False),
    ("127.0.0.1", "trustedProxiesOrLoopback", (), True),
    ("127.0.0.6", "trustedProxiesOrLoopback", (), True),  # a mesh proxy's inbound source
    ("::1", "trustedProxiesOrLoopback", (), True),
    ("::ffff:127.0.0.1", "trustedProxiesOrLoopback", (), True),  # a dual-stack listener
    ("10.1.2.3", "trustedProxiesOrLoopback", (), False),
    ("10.1.2.3", "trustedProxiesOrLoopback", ("10.0.0.0/8",), True),
    ("not-an-ip", "trustedProxiesOrLoopback", ("10.0.0.0/8",), False),
])
def test_who_may_set_the_identity_header(peer: str, header_from: str, trusted_proxies: tuple[str, ...],
                                         believed: bool) -> None:

    ident = Identify(order=(Source.HEADER, Source.IP), header="X-User-Id",
                     trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted_proxies),
                     header_from=HeaderFrom(header_from))
    assert header_trusted(peer, ident) is believed
    trust = PeerTrust(ident)
    for _ in range(2):  # computed, then cached
        assert trust.verdict(peer)[1] is believed
        h = CIMultiDictProxy(CIMultiDict([("X-User-Id", "alice")]))
        assert anonymous_client(h, peer, trust) == (client_for_header("alice") if believed else client_for_ip(peer))


def test_peer_verdicts_are_cached_within_a_bound() -> None:
    ident = Identify(order=(Source.HEADER, Source.IP), header="X-User-Id",
                     trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    trust = PeerTrust(ident)
    peers = [str(ipaddress.IPv6Address(0x20010DB8 << 96) + i) for i in range(3 * PeerTrust.MAX_PEERS)]
    for peer in [*peers, "10.1.2.3"]:
        assert trust.verdict(peer) == (peer == "10.1.2.3",) * 2
        assert len(trust._verdicts) <= PeerTrust.MAX_PEERS


# IPv4-mapped peers and IPv6 clients -------------------------------------------------------------
def test_an_ipv4_mapped_peer_is_its_ipv4_address() -> None:
    """A dual-stack listener reports the IPv4 peer 10.1.2.3 as ``::ffff:10.1.2.3``: it is the
    trusted proxy ``10.0.0.0/8`` names, so X-Forwarded-For is walked, and as a client it is
    keyed as the IPv4 address (the same bucket on either kind of listener)."""
    ten = (ipaddress.ip_network("10.0.0.0/8"),)
    assert is_trusted("::ffff:10.1.2.3", ten)
    assert not is_trusted("::ffff:11.1.2.3", ten)
    assert client_ip("::ffff:10.1.2.3", "203.0.113.9", ten) == "203.0.113.9"
    assert client_ip("10.1.2.3", "::ffff:203.0.113.9", ten) == "203.0.113.9"
    assert client_for_ip("::ffff:203.0.113.9") == client_for_ip("203.0.113.9")
    trust = PeerTrust(Identify(trusted_proxies=ten))
    assert trust.verdict("::ffff:10.1.2.3")[0]


def test_an_ipv6_client_is_its_slash_64() -> None:
    """Every address of one /64 is one client (one bucket); another /64 is another client."""
    one = client_for_ip("2001:db8:1:2::5")
    assert client_for_ip("2001:db8:1:2:ffff:ffff:ffff:ffff") == one
    assert client_for_ip("2001:0db8:0001:0002:0000:0000:0000:0001") == one  # any spelling
    assert client_for_ip("2001:db8:1:3::5") != one
    assert client_for_ip("203.0.113.9") == "i203.0.113.9"  # IPv4: the address itself
    assert ip_group("2001:db8:1:2::5") == "2001:db8:1:2::/64"


@given(st.ip_addresses(v=6))
def test_ipv6_clients_are_keyed_by_their_prefix(addr: ipaddress.IPv6Address) -> None:
    if addr.ipv4_mapped is not None:
        assert client_for_ip(str(addr)) == "i" + str(addr.ipv4_mapped)
    else:
        net = ipaddress.IPv6Network((addr, 64), strict=False)
        assert client_for_ip(str(addr)) == client_for_ip(str(net.network_address)) == f"i{net}"


@given(st.ip_addresses(v=6), st.integers(min_value=48, max_value=128))
def test_an_ipv6_group_is_spelt_as_the_ipaddress_module_spells_it(addr: ipaddress.IPv6Address,
                                                                   prefix: int) -> None:
    """The group is computed with inet_pton/inet_ntop (17x cheaper for a client that rotates
    addresses); it must name the same network in the same spelling, also where glibc would
    write an address whose first 96 bits are zero as ``::1.2.3.4``."""
    for a in (addr, ipaddress.IPv6Address(int(addr) & (2**32 - 1))):  # and one with a zero head
        if a.ipv4_mapped is not None:
            expected = str(a.ipv4_mapped)
        elif prefix == 128:
            expected = str(a)
        else:
            expected = str(ipaddress.IPv6Network((a, prefix), strict=False))
        assert ip_group(str(a), prefix) == ip_group(a.exploded, prefix) == expected


@pytest.mark.parametrize(("prefix", "same", "other"), [
    (64, "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"),
    (48, "2001:db8:1:ffff::9", "2001:db8:2::1"),  # another /64 of the same /48: one client
    (128, "2001:db8:1:2::1", "2001:db8:1:2::2"),  # each address its own client
])
def test_the_policy_chooses_the_ipv6_prefix(prefix: int, same: str, other: str) -> None:
    trust = PeerTrust(Identify(order=(Source.IP,), ipv6_prefix_length=prefix))
    no_headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    first = anonymous_client(no_headers, "2001:db8:1:2::1", trust)
    assert anonymous_client(no_headers, same, trust) == first
    assert anonymous_client(no_headers, other, trust) != first


@pytest.mark.parametrize("value", [47, 129, 0, "64", True, 64.0])
def test_ipv6_prefix_length_is_checked(value: object) -> None:
    doc = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy", "metadata": {"name": "p"},
           "spec": {"identify": {"ipv6PrefixLength": value},
                    "tiers": [{"name": "free", "requests": 5, "period": "1m"}]}}
    with pytest.raises(PolicyErrors, match=r"spec\.identify\.ipv6PrefixLength: must be an integer from 48 to 128"):
        parse_policy(doc)
    doc["spec"]["identify"] = {"ipv6PrefixLength": 56}  # type: ignore[index]
    policy = parse_policy(doc)
    assert policy.identify.ipv6_prefix_length == 56
    assert parse_policy(to_manifest(policy)).identify.ipv6_prefix_length == 56  # kept through Redis
    del doc["spec"]["identify"]  # type: ignore[attr-defined]
    assert "ipv6PrefixLength" not in to_manifest(parse_policy(doc)).get("spec", {}).get("identify", {})
