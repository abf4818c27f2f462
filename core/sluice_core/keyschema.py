"""The Redis key schema: every key Sluice reads or writes is spelled here and nowhere else.

Bucket keys carry one hash tag per decision, ``{<policy id>:<client>}``, so the tier bucket and
the route bucket of one request always live in the same Redis Cluster slot and the decision
script runs unchanged on a single Redis, Sentinel or Cluster. The client part never contains
``{`` or ``}``: API keys and header values are hashed, IP addresses cannot contain them.

Bucket keys are kept short on purpose (``sl:{Ab3dE_:kQWERTYUIOPASDFGH}:t:pro:x7Q``, 39 bytes): with
millions of clients the key bytes are most of Redis's memory per bucket. The policy id is 36 bits
of SHA-256 of ``namespace/name``; a client's key or header value contributes 96 bits.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import socket
from dataclasses import dataclass

PREFIX = "sluice"
CONFIG_CHANNEL = f"{PREFIX}:config-changed"
KEYS_CHANNEL = f"{PREFIX}:keys-changed"
"""Change notices of API-key grants: ``"<policy id> <client id>"`` when one key's grant was
written or removed, ``"<policy id> *"`` when many were (a bulk apply): a sidecar drops what it
cached of that key, or of every key of that policy."""
ALL_KEYS = "*"


def config_key(namespace: str) -> str:
    """Hash with fields ``version`` (integer) and ``doc`` (JSON), one per namespace.

    The hash tag keeps both fields in one slot; ``_cluster`` (:data:`~sluice_core.model.CLUSTER_SCOPE`)
    holds the cluster-scoped policies."""
    return f"{PREFIX}:cfg:{{{namespace}}}"


def heartbeat_key(namespace: str) -> str:
    """Hash of sidecar heartbeats for one namespace: field = pod name, value = a
    :class:`Heartbeat`, written by sidecars from before :data:`HEARTBEATS_KEY` (the operator
    still counts and prunes them during a rolling upgrade); the key itself has a TTL."""
    return f"{PREFIX}:hb:{{{namespace}}}"


HEARTBEATS_KEY = f"{PREFIX}:hbs"
"""Sorted set of every sidecar's heartbeat, all namespaces: member = :func:`heartbeat_member`
(what the sidecar enforces, without the time), score = the unix time of its last beat. The
operator reads the fresh ones in one command an interval, however many namespaces it serves,
and prunes the stale ones; a sidecar whose state changes adds a new member (the old one goes
stale). Sidecars from before it wrote the per-namespace hash (:func:`heartbeat_key`) instead."""

USAGE_STREAM_KEY = f"{PREFIX}:{{usage}}:windows"
"""Stream of usage windows (:mod:`sluice_core.usage`): one entry per sidecar per flush window,
appended with ``XADD ... MAXLEN ~`` (so a collector that is down never fills Redis), read by
``sluice analytics`` with a consumer group. The hash tag puts it in one slot of a Redis Cluster."""
USAGE_GROUP = "sluice-analytics"
"""The consumer group of ``sluice analytics`` on :data:`USAGE_STREAM_KEY` (every replica joins it)."""
USAGE_REJECTED_KEY = f"{PREFIX}:{{usage}}:rejected"
"""Stream where ``sluice analytics`` keeps aside the entries it could not decode (the entry's
fields, its id and the reason), ``MAXLEN ~`` bounded; same hash tag as the windows."""

USAGE_SUMMARY_KEY = f"{PREFIX}:{{usage}}:summary"
"""Hash of the usage summary (:mod:`sluice_core.usagesummary`): field ``@`` says when it was
computed, each other field is a policy (its usage ref: ``namespace/name``, a cluster policy's
name) -> the JSON of its last hour. Written whole by ``sluice analytics`` (at most once a
:data:`~sluice_core.usagesummary.INTERVAL_S`, with a TTL: a stopped collector's summary
expires), read by the operator for ``status.usage`` (one HMGET a thousand policies an interval)."""
USAGE_SUMMARY_LOCK_KEY = f"{PREFIX}:{{usage}}:summary:lock"
"""The collector replica that writes the summary this interval (its consumer name, ``SET NX PX``)."""

OPERATOR_EPOCH_KEY = f"{PREFIX}:epoch"
"""Hash, field = an operator's scope (its ``--namespace`` patterns, ``*`` when cluster-wide),
value = a counter the operator increments after each config write and compares every interval:
missing or not what it wrote, Redis lost or rolled back (an older snapshot) what it wrote."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one sidecar enforces: the namespace document's version and the policy it selected
    there, the cluster document's version and the cluster policy it selected (``-``: none).
    Policies are named by reference (``*_ref``), as Kubernetes refers to objects: a namespaced
    one by ``namespace/name``, a cluster-scoped one by its name (``/readyz``'s ``policyRef`` and
    ``clusterPolicyRef``). Here the key names the namespace, so ``policy_ref`` holds the
    namespace's policy's name alone.

    Stored as ``"<version> <unix s> <policy> <cluster version> <cluster policy> <capabilities>"``;
    policy names are Kubernetes names, so never contain spaces. The fields are positional:
    renaming an attribute here changes nothing stored, so sidecars and operators of different
    releases read each other's heartbeats (a rolling upgrade). ``capabilities`` (comma-separated,
    ``-``: none) is what the sidecar can do that an operator may need to know before relying on
    it; ``None`` marks a sidecar from before the field (five fields, in the per-namespace hash).
    The operator relies on a capability only once every sidecar it counts has it."""

    version: int
    at: float
    policy_ref: str | None = None
    cluster_version: int = 0
    cluster_policy_ref: str | None = None
    capabilities: frozenset[str] | None = None

    def state(self) -> str:
        """Everything but the time."""
        text = f"{self.version} {self.policy_ref or '-'} {self.cluster_version} {self.cluster_policy_ref or '-'}"
        if self.capabilities is not None:
            text += " " + (",".join(sorted(self.capabilities)) or "-")
        return text

    def encode(self) -> str:
        version, rest = self.state().split(" ", 1)
        return f"{version} {self.at:.0f} {rest}"


CAPABILITY_REDIS_GRANTS = "grants"
"""A heartbeat capability: the sidecar resolves API keys from their Redis grants
(:mod:`sluice_core.grants`) when its config document embeds none, so an operator may stop
embedding keys in a namespace's document once every sidecar counted there says so."""


def parse_heartbeat(value: bytes | str) -> Heartbeat:
    """A stored heartbeat; ``Heartbeat(0, 0.0)`` (stale, enforcing nothing) if malformed."""
    parts = (value.decode(errors="replace") if isinstance(value, bytes) else value).split(" ")
    try:
        version, at = int(parts[0]), float(parts[1])
        cluster_version = int(parts[3]) if len(parts) > 3 else 0
    except (ValueError, IndexError):
        return Heartbeat(0, 0.0)

    def name(i: int) -> str | None:
        return parts[i] if len(parts) > i and parts[i] != "-" else None

    caps = None if len(parts) <= 5 else frozenset(c for c in parts[5].split(",") if c and c != "-")
    return Heartbeat(version, at, name(2), cluster_version, name(4), caps)


def heartbeat_member(namespace: str, pod: str, beat: Heartbeat) -> str:
    """A sidecar's member of :data:`HEARTBEATS_KEY`: ``"<namespace> <pod> <state>"``."""
    return f"{namespace} {pod} {beat.state()}"


def parse_heartbeat_member(member: bytes | str, at: float) -> tuple[str, str, Heartbeat] | None:
    """``(namespace, pod, heartbeat at time at)`` of a :func:`heartbeat_member`; None if malformed."""
    parts = (member.decode(errors="replace") if isinstance(member, bytes) else member).split(" ", 3)
    if len(parts) < 4:
        return None
    ns, pod, version, rest = parts
    beat = parse_heartbeat(f"{version} {at:.0f} {rest}")
    return (ns, pod, beat) if beat.at else None


def hash_api_key(key: str) -> str:
    """SHA-256 hex digest: the only form in which an API key is stored or compared."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def short_digest(value: str) -> str:
    """12 bytes of SHA-256, base64url (16 characters): a compact, brace-free id."""
    return _b64(hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()[:12])


def policy_id(policy_ref: str) -> str:
    """6 characters naming a policy (``namespace/name``) inside bucket keys."""
    return _b64(hashlib.sha256(policy_ref.encode()).digest()[:6])[:6]


def client_for_api_key(key_sha256: bytes) -> str:
    """Client id of a known API key, from its SHA-256 digest (raw bytes)."""
    return "k" + _b64(key_sha256[:12])


def client_for_header(value: str) -> str:
    return "h" + short_digest(value)


IPV6_CLIENT_PREFIX = 64
"""By default an IPv6 client is its /64: the smallest network a host or site is normally given
(SLAAC, RFC 6177), so one subscriber cannot take 2^64 fresh buckets by rotating its addresses.
A policy may choose another length (``identify.ipv6PrefixLength``)."""


def client_for_ip(ip: str, ipv6_prefix: int = IPV6_CLIENT_PREFIX) -> str:
    return "i" + ip_group(ip, ipv6_prefix)


_V4_MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def _ipv6_group(ip: str, prefix: int) -> str:
    # inet_pton/inet_ntop rather than the ipaddress module: a client rotating addresses misses
    # the cache on every request, and this costs 0.8 µs where ipaddress took 13 µs. Both spell
    # an address the same way, except where its first 96 bits are zero (glibc writes
    # "::1.2.3.4"): those few take the ipaddress path, so that a group has one spelling.
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        return ip
    head = packed[:12]
    if head == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if head == bytes(12):
        addr = ipaddress.IPv6Address(packed)
        return str(addr) if prefix >= 128 else str(ipaddress.IPv6Network((addr, prefix), strict=False))
    if prefix >= 128:
        return socket.inet_ntop(socket.AF_INET6, packed)
    shift = 128 - prefix
    network = (int.from_bytes(packed, "big") >> shift << shift).to_bytes(16, "big")
    return f"{socket.inet_ntop(socket.AF_INET6, network)}/{prefix}"


def ip_group(ip: str, ipv6_prefix: int = IPV6_CLIENT_PREFIX) -> str:
    """The address one client stands for: an IPv4 address itself, an IPv4-mapped IPv6 address
    (``::ffff:10.1.2.3``, from a dual-stack listener) its IPv4 address, any other IPv6 address
    its network of ``ipv6_prefix`` bits (``2001:db8:1:2::/64``; at 128 the address itself).
    Text that is not an address is returned as is."""
    return _ipv6_group(ip, ipv6_prefix) if ":" in ip else ip  # IPv4, the common case, is not parsed


def client_tag(policy_ref: str, client_id: str) -> str:
    """The hash-tagged prefix shared by every bucket of one client under one policy."""
    return client_tag_for(policy_id(policy_ref), client_id)


def client_tag_for(policy_id_: str, client_id: str) -> str:
    """:func:`client_tag` with the policy id already computed (the sidecar's hot path)."""
    return f"sl:{{{policy_id_}:{client_id}}}"


def grant_key(policy_id_: str, client_id: str) -> str:
    """An API key's grant under one policy (:mod:`sluice_core.grants`): beside the key's own
    buckets, in their hash tag, so the decision script reads it in the same call."""
    return client_tag_for(policy_id_, client_id) + ":g"


def grant_index_key(policy_id_: str) -> str:
    """Set of the client ids (``k<16 chars>``) of every API key granted under one policy: what a
    re-apply revokes from and what tools count (SCARD) or list (SSCAN) without SCAN. It holds
    at least every key that has a grant (written before the grant, removed after it), so it
    may briefly list a key whose grant is gone (expired, or a write cut short): harmless.

    A set of client ids rather than a hash to key ids: the grant holds the rest, and a set is
    what SMISMEMBER compares a re-apply's staged keys with, a page at a time. About 64-76
    bytes a key (a hashtable of 17-byte strings). Hash tag ``{<policy id>}``: one slot, so one
    node of a Cluster holds a policy's whole index (~70 MB per million keys); spreading it over
    several sets would make counting and listing several calls, for no need at that size."""
    return f"{PREFIX}:keys:{{{policy_id_}}}"


def grant_staging_key(policy_id_: str) -> str:
    """The set of the client ids the running ``sluice apply`` of one policy's keys lists (and a
    marker member ``!<run>`` naming the run), beside :func:`grant_index_key` (same slot). It
    finds duplicates and, after the writes, the index entries the file no longer lists. No TTL
    (an eviction policy must not drop it mid-run: every key would look unlisted): the run
    deletes it at its end, and the next run of the policy sweeps one a dead run left."""
    return f"{PREFIX}:keys:{{{policy_id_}}}:apply"


def grant_lease_key(policy_id_: str) -> str:
    """The lease of the one run that may apply a policy's keys (its run id, ``SET NX PX``,
    renewed at every batch), same slot as :func:`grant_index_key`."""
    return f"{PREFIX}:keys:{{{policy_id_}}}:lease"


def grant_touched_key(policy_id_: str) -> str:
    """The client ids written or revoked one at a time (``configstore.put_grant`` /
    ``revoke_grant``) while a run holds :func:`grant_lease_key`: that run keeps them, whatever
    its keys file says. No TTL; dropped with the staging set."""
    return f"{PREFIX}:keys:{{{policy_id_}}}:touched"


def keys_notice(policy_id_: str, client_id: str = ALL_KEYS) -> str:
    """The :data:`KEYS_CHANNEL` message for one key's grant (or, by default, all of a policy's)."""
    return f"{policy_id_} {client_id}"


def limit_tag(em_us: int, cap_us: int) -> str:
    """3 characters naming a bucket's numbers (EM, CAP), part of its key.

    A tier's or rule's bucket is kept across config changes, except when its limit changes:
    then the key changes and every client starts with a full bucket under the new limit, rather
    than carrying a debt measured by the old one. (One change in 2^18 maps to the same tag and
    keeps its debt, which the new limit then refills: harmless.) The old keys expire on their own."""
    return _b64(hashlib.sha256(f"{em_us}/{cap_us}".encode()).digest()[:3])[:3]


def tier_suffix(tier: str, em_us: int, cap_us: int) -> str:
    """Appended to a client tag: the tier bucket (precomputed once per config load)."""
    return f":t:{tier}:{limit_tag(em_us, cap_us)}"


def rule_suffix(rule: str, em_us: int, cap_us: int) -> str:
    return f":r:{rule}:{limit_tag(em_us, cap_us)}"


def tier_bucket_key(tag: str, tier: str, em_us: int, cap_us: int) -> str:
    return tag + tier_suffix(tier, em_us, cap_us)


def rule_bucket_key(tag: str, rule: str, em_us: int, cap_us: int) -> str:
    return tag + rule_suffix(rule, em_us, cap_us)
