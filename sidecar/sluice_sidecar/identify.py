"""Who is the client? API key, a trusted header, or the IP address — never a spoofed one.

``X-Forwarded-For`` is honoured only hop by hop from trusted proxies: starting at the TCP peer,
while the current hop is a trusted proxy, step one entry left in X-Forwarded-For. The first
untrusted address is the client. A peer that is not a trusted proxy is the client, whatever
headers it sends. The identity header is believed only from the peers ``identify.headerFrom``
names (trusted proxies, and the pod's loopback when the policy says so).

A header may arrive as several field lines. X-Forwarded-For is a list: its lines are combined
exactly as the proxy forwards them (comma-joined in order, RFC 9110 §5.3), so the trusted proxy's
own appended line is the one walked first. The API key, ``Authorization`` and the identity header
hold one value: sent as several lines they are ambiguous and count as absent (the client falls
to the next identity source, or gets a 401 when a key is required); picking one line would let
the client choose what Sluice counts while the app may read another. ``Forwarded`` (RFC 7239) is
not read.

Addresses are compared and keyed as one client stands for them: an IPv4-mapped IPv6 address (a
dual-stack listener's ``::ffff:10.1.2.3``) is its IPv4 address, and an IPv6 client is its
network of ``identify.ipv6PrefixLength`` bits, /64 by default (:func:`~sluice_core.keyschema.ip_group`).
"""

from __future__ import annotations

import ipaddress

from multidict import MultiMapping
from sluice_core.keyschema import IPV6_CLIENT_PREFIX, client_for_header, client_for_ip
from sluice_core.model import HeaderFrom, Identify, IPNetwork, Source

MAX_XFF_HOPS = 32  # a longer chain is not walked further (header tricks stay cheap)
MAX_IDENTITY_LENGTH = 512  # longer API keys or identity headers are treated as absent


def client_ip(peer: str, xff: str | None, trusted: tuple[IPNetwork, ...], *,
              peer_trusted: bool | None = None) -> str:
    """The client address: ``peer`` unless it is a trusted proxy, then walk X-Forwarded-For
    while the hop is trusted too. ``peer_trusted``: the verdict on ``peer`` when already known."""
    if not trusted or not xff:
        return peer
    if not (is_trusted(peer, trusted) if peer_trusted is None else peer_trusted):
        return peer
    hops = xff.split(",")
    current = peer
    for raw in reversed(hops[-MAX_XFF_HOPS:]):
        hop = raw.strip()
        addr = parse_ip(hop)
        if addr is None:
            return current  # garbage written by an untrusted hop: stop at the last good one
        current = str(addr)
        if not any(addr in net for net in trusted):
            return current
    return current


def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ip`` parsed, an IPv4-mapped IPv6 address unwrapped: a dual-stack listener reports the
    IPv4 peer 10.1.2.3 as ``::ffff:10.1.2.3``, which must match ``10.0.0.0/8`` as it is. None
    when it is not an address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_trusted(ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    addr = parse_ip(ip)
    return addr is not None and any(addr in net for net in trusted)


def list_field(headers: MultiMapping[str], name: str) -> str | None:
    """A list-valued header's field lines combined as the proxy forwards them (comma-joined in
    order); one line is returned as is, at no extra cost."""
    values = headers.getall(name, ())
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


def single_field(headers: MultiMapping[str], name: str) -> str | None:
    """A header that holds one value: None when absent or sent as several field lines."""
    values = headers.getall(name, ())
    return values[0] if len(values) == 1 else None


def header_trusted(peer: str, ident: Identify) -> bool:
    """May ``peer`` name the client with the identity header? Only a trusted proxy, or a
    process in the pod itself (loopback) when ``headerFrom`` says the pod's own auth layer
    sets it."""
    if is_trusted(peer, ident.trusted_proxies):
        return True
    if ident.header_from is not HeaderFrom.TRUSTED_PROXIES_OR_LOOPBACK:
        return False
    addr = parse_ip(peer)
    return addr is not None and addr.is_loopback


class PeerTrust:
    """One policy's verdicts on TCP peers: is it a trusted proxy, may it set the identity header.
    Cached by address (parsing one costs microseconds and a peer sends many requests), and
    bounded: when full the cache starts over, so many addresses cost time, never memory."""

    MAX_PEERS = 4096
    __slots__ = ("_never", "_verdicts", "ident")

    def __init__(self, ident: Identify) -> None:
        self.ident = ident
        self._never = not ident.trusted_proxies and ident.header_from is HeaderFrom.TRUSTED_PROXIES
        self._verdicts: dict[str, tuple[bool, bool]] = {}

    def verdict(self, peer: str) -> tuple[bool, bool]:
        """(``peer`` is a trusted proxy, ``peer`` may set the identity header)."""
        if self._never:
            return False, False
        v = self._verdicts.get(peer)
        if v is None:
            if len(self._verdicts) >= self.MAX_PEERS:
                self._verdicts.clear()
            v = self._verdicts[peer] = (is_trusted(peer, self.ident.trusted_proxies),
                                        header_trusted(peer, self.ident))
        return v


def anonymous_client(headers: MultiMapping[str], peer: str, trust: PeerTrust) -> str:
    """The client id of a request without a known API key: the identity header when the peer
    may set it, else the client address (X-Forwarded-For walked only from a trusted proxy, and
    read only then), in ``identify.order``."""
    ident = trust.ident
    proxy, header_ok = trust.verdict(peer)
    hv = single_field(headers, ident.header) if header_ok and ident.header is not None else None
    xff = list_field(headers, "X-Forwarded-For") if proxy else None
    ip = client_ip(peer, xff, ident.trusted_proxies, peer_trusted=proxy)
    return identity(ident.order, header_value=hv, ip=ip, ipv6_prefix=ident.ipv6_prefix_length)


def api_key_from(headers: MultiMapping[str], header: str) -> str | None:
    """The API key sent in ``header``; ``Authorization: Bearer <key>`` is understood."""
    value = single_field(headers, header)
    if not value or len(value) > MAX_IDENTITY_LENGTH:
        return None
    value = value.strip()
    if header.lower() == "authorization":
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return None
        value = token.strip()
    return value or None


def identity(order: tuple[Source, ...], *, header_value: str | None,
             ip: str, ipv6_prefix: int = IPV6_CLIENT_PREFIX) -> str:
    """The client id used in bucket keys (brace-free, bounded length), for sources other than
    a known API key (which the caller handles: its id is the key's digest)."""
    for source in order:
        if source is Source.API_KEY:
            continue  # only known keys identify a client; see Limiter
        if source is Source.HEADER and header_value and len(header_value) <= MAX_IDENTITY_LENGTH:
            return client_for_header(header_value)
        if source is Source.IP:
            return client_for_ip(ip, ipv6_prefix)
    return client_for_ip(ip, ipv6_prefix)  # a policy listing only apiKey still needs a bucket for keyless clients
