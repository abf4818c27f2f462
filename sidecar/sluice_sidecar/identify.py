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
"""

from __future__ import annotations

import ipaddress

from multidict import MultiMapping
from sluice_core.keyschema import client_for_header, client_for_ip
from sluice_core.model import HeaderFrom, Identify, IPNetwork, Source

MAX_XFF_HOPS = 32  # a longer chain is not walked further (header tricks stay cheap)
MAX_IDENTITY_LENGTH = 512  # longer API keys or identity headers are treated as absent


def client_ip(peer: str, xff: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The client address: ``peer`` unless it is a trusted proxy, then walk X-Forwarded-For."""
    if not trusted or not xff or not is_trusted(peer, trusted):
        return peer
    hops = xff.split(",")
    current = peer
    for raw in reversed(hops[-MAX_XFF_HOPS:]):
        hop = raw.strip()
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return current  # garbage written by an untrusted hop: stop at the last good one
        current = str(addr)
        if not is_trusted(current, trusted):
            return current
    return current


def is_trusted(ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


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
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener reports 127.0.0.1 as ::ffff:127.0.0.1
    return addr.is_loopback


def header_identity(headers: MultiMapping[str], peer: str, ident: Identify) -> str | None:
    """The identity header's value, when the policy uses one and ``peer`` may set it."""
    if ident.header is None or not header_trusted(peer, ident):
        return None
    return single_field(headers, ident.header)


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
             ip: str) -> str:
    """The client id used in bucket keys (brace-free, bounded length), for sources other than
    a known API key (which the caller handles: its id is the key's digest)."""
    for source in order:
        if source is Source.API_KEY:
            continue  # only known keys identify a client; see Limiter
        if source is Source.HEADER and header_value and len(header_value) <= MAX_IDENTITY_LENGTH:
            return client_for_header(header_value)
        if source is Source.IP:
            return client_for_ip(ip)
    return client_for_ip(ip)  # a policy listing only apiKey still needs a bucket for keyless clients
