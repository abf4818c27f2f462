"""An API key's grant as stored in Redis: one small string per (policy, key).

A grant lives under the key's own client hash tag, beside the buckets it governs
(:func:`sluice_core.keyschema.grant_key`), so the decision script can read it and pick the
bucket in the same atomic call, on a single Redis, Sentinel and Redis Cluster alike. Nothing
about a grant is in the namespace's config document: one key change is one Redis write and one
change notice, whatever the number of keys.

Encoding, version 1 (``|``-separated; Lua reads it with one pattern)::

    1|<tier>|<requests>|<period_us>|<burst>|<limit tag>|<expires unix ms>|<key id>

- ``tier``: a tier name of the policy (an RFC 1123 label, never contains ``|``).
- ``requests|period_us|burst|limit tag``: the key's own limit, all four empty for a key that
  takes its tier's bucket. The limit tag (:func:`~sluice_core.keyschema.limit_tag` of its
  EM/CAP) names the key's own bucket (``<client tag>:t:<tier>:<limit tag>``): the script cannot
  compute SHA-256, so the writer does.
- ``expires unix ms``: 0 for never. Redis also drops the key then (``PEXPIREAT``); the value
  carries it so that a sidecar's cached copy never outlives it.
- ``key id``: how usage reports and the operator name the key (a Secret's ``namespace/name``, a
  keys file's entry); never the key itself. Last, so it is free-form (printable, no newline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sluice_core.keyschema import limit_tag
from sluice_core.model import KeyGrant, Limit

ENCODING = "1"
MAX_KEY_ID = 256
_KEY_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_ID}}}")  # printable ASCII, no space


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """What Redis holds for one API key under one policy."""

    grant: KeyGrant
    key_id: str
    expires_ms: int = 0  # unix ms after which the key no longer works; 0: never

    def live(self, now_ms: int) -> bool:
        return self.expires_ms == 0 or now_ms < self.expires_ms


def encode(stored: StoredGrant) -> str:
    """The Redis value of a grant; ValueError for a key id that cannot be stored."""
    if not _KEY_ID.fullmatch(stored.key_id):
        raise ValueError(f"key id must be 1-{MAX_KEY_ID} printable ASCII characters without spaces")
    g = stored.grant
    if g.limit is None:
        own = "|||"
    else:
        lim = g.limit
        own = f"{lim.requests}|{lim.period_us}|{lim.burst}|{limit_tag(lim.emission_us, lim.capacity_us)}"
    return f"{ENCODING}|{g.tier}|{own}|{stored.expires_ms}|{stored.key_id}"


def decode(value: str | bytes) -> StoredGrant:
    """A stored grant; ValueError naming what is wrong (a value from another release, or
    damaged)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    parts = text.split("|", 7)
    if len(parts) != 8 or parts[0] != ENCODING:
        raise ValueError(f"grant value is not encoding {ENCODING} (8 fields)")
    _, tier, requests, period_us, burst, _tag, expires_ms, key_id = parts
    if not tier:
        raise ValueError("grant value has no tier")
    try:
        limit = Limit(int(requests), int(period_us), int(burst)) if requests else None
        expires = int(expires_ms)
    except ValueError:
        raise ValueError("grant value has a number that is not an integer") from None
    return StoredGrant(KeyGrant(tier=tier, limit=limit), key_id, expires)
