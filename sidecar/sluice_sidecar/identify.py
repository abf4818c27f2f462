"""Who is the client? API key, a trusted header, or the IP address — never a spoofed one.

``X-Forwarded-For`` is honoured only hop by hop from trusted proxies: starting at the TCP peer,
while the current hop is a trusted proxy, step one entry left in X-Forwarded-For. The first
untrusted address is the client. A peer that is not a trusted proxy is the client, whatever
headers it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from sluice_core.keyschema import client_for_header, client_for_ip
from sluice_core.model import IPNetwork, Source

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


def api_key_from(headers: Mapping[str, str], header: str) -> str | None:
    """The API key sent in ``header``; ``Authorization: Bearer <key>`` is understood."""
    value = headers.get(header)
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
