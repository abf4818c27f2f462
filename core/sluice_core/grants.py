"""An API key's grant as stored in Redis: one small string per (policy, key).

A grant lives under the key's own client hash tag, beside the buckets it governs
(:func:`sluice_core.keyschema.grant_key`), so the decision script can read it and pick the
bucket in the same atomic call, on a single Redis, Sentinel and Redis Cluster alike. Nothing
about a grant is in the namespace's config document: one key change is one Redis write and one
change notice, whatever the number of keys.

Encoding, version 2 (``|``-separated; Lua reads it with one pattern)::

    2|<tier>|<requests>|<period_us>|<burst>|<limit tag>|<expires unix ms>|<policy tag>|<key id>

- ``tier``: a tier name of the policy (an RFC 1123 label, never contains ``|``).
- ``requests|period_us|burst|limit tag``: the key's own limit, all four empty for a key that
  takes its tier's bucket. The limit tag (:func:`~sluice_core.keyschema.limit_tag` of its
  EM/CAP) names the key's own bucket (``<client tag>:t:<tier>:<limit tag>``): the script cannot
  compute SHA-256, so the writer does.
- ``expires unix ms``: 0 for never. Redis also drops the key then (``PEXPIREAT``); the value
  carries it so that a sidecar's cached copy never outlives it.
- ``policy tag``: :func:`policy_tag` of the policy's ref, 128 bits of its SHA-256. The grant
  key names the policy by its 36-bit :func:`~sluice_core.keyschema.policy_id` only, which a
  tenant who may name a policy can grind to collide with another's (~2^36 hashes); the decision
  script compares this tag with the one the sidecar sends, so a grant written for the colliding
  policy is an unknown key to the other.
- Numbers are ASCII digits only, at most 15 of them (below 2^53: exact in Lua's doubles), and
  read by the same rule here and in ``scripts/decide.lua``: a value one side would read and the
  other not (``0x10``, ``1e3``, `` 5``, ``1_000``) is refused by both.
- ``key id``: how usage reports and the operator name the key (a Secret's ``namespace/name``, a
  keys file's entry); never the key itself. Last, so it is free-form (printable, no newline).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from sluice_core.keyschema import limit_tag
from sluice_core.model import KeyGrant, Limit

ENCODING = "2"
MAX_KEY_ID = 256
_KEY_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_ID}}}")  # printable ASCII, no space
_NUMBER = re.compile(r"[0-9]{1,15}")  # as decide.lua's %d+ with its length check
POLICY_TAG_CHARS = 22  # base64url of 128 bits


def default_key_id(digest_hex: str) -> str:
    """How a key given without an ``id`` is named: a short prefix of its SHA-256 digest."""
    return f"sha256:{digest_hex[:16]}"


def valid_key_id(key_id: object) -> bool:
    """Can ``key_id`` name a key (stored in a grant, a config document, a usage report)?"""
    return isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) is not None


def policy_tag(policy_ref: str) -> str:
    """The policy a grant belongs to, as its value names it: base64url (no padding) of the
    first 128 bits of SHA-256 of the ref (``namespace/name``, a cluster policy's name)."""
    digest = hashlib.sha256(policy_ref.encode("utf-8")).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """What Redis holds for one API key under one policy."""

    grant: KeyGrant
    key_id: str
    expires_ms: int = 0  # unix ms after which the key no longer works; 0: never

    def live(self, now_ms: int) -> bool:
        return self.expires_ms == 0 or now_ms < self.expires_ms


def encode(stored: StoredGrant, policy_ref: str) -> str:
    """The Redis value of a grant under ``policy_ref``; ValueError for a key id that cannot be
    stored."""
    if not valid_key_id(stored.key_id):
        raise ValueError(f"key id must be 1-{MAX_KEY_ID} printable ASCII characters without spaces")
    g = stored.grant
    if g.limit is None:
        own = "|||"
    else:
        lim = g.limit
        own = f"{lim.requests}|{lim.period_us}|{lim.burst}|{limit_tag(lim.emission_us, lim.capacity_us)}"
    return f"{ENCODING}|{g.tier}|{own}|{stored.expires_ms}|{policy_tag(policy_ref)}|{stored.key_id}"


def decode(value: str | bytes, policy_ref: str | None = None) -> StoredGrant:
    """A stored grant; ValueError naming what is wrong (a value from another release, damaged,
    or, with ``policy_ref``, written for another policy)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    parts = text.split("|", 8)
    if len(parts) != 9 or parts[0] != ENCODING:
        raise ValueError(f"grant value is not encoding {ENCODING} (9 fields)")
    _, tier, requests, period_us, burst, _tag, expires_ms, ptag, key_id = parts
    if not tier:
        raise ValueError("grant value has no tier")
    if policy_ref is not None and ptag != policy_tag(policy_ref):
        raise ValueError("grant value was written for another policy")
    own = (requests, period_us, burst)
    if not requests and (period_us or burst or _tag):
        raise ValueError("grant value has a partial own limit")
    if not _NUMBER.fullmatch(expires_ms) or (requests and not all(_NUMBER.fullmatch(n) for n in own)):
        raise ValueError("grant value has a number that is not 1-15 ASCII digits")
    if requests and min(int(n) for n in own) < 1:
        raise ValueError("grant value has an own limit below 1")
    limit = Limit(int(requests), int(period_us), int(burst)) if requests else None
    return StoredGrant(KeyGrant(tier=tier, limit=limit), key_id, int(expires_ms))
