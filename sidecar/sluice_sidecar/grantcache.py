"""The sidecar's bounded cache of API-key grants resolved from Redis, one per enforced policy.

A policy whose config document embeds no ``apiKeys`` has its keys resolved from their Redis
grants by the decision script (a "resolve" decision, ``scripts/decide.lua``), in the call that
decides the request. What it learnt is kept here, so that the next request of a known key takes
the ordinary hot path (one dictionary look-up, no extra Redis work) and a repeated unknown key
costs no resolve at all:

- a known key maps to the bucket its grant names (tier or own limit) and the grant's expiry: an
  entry is never used past it (then the key is resolved again, and Redis has dropped it);
- an unknown key maps to :data:`UNKNOWN`. Unknown keys live in a table of their own, so a flood
  of random keys cannot push the known ones out.

Both tables are LRU, bounded by ``size`` entries each, and no entry is used longer than
``max_age_s`` after it was resolved (then the key is resolved again): a revocation whose notice
was lost (a pub/sub connection dropped silently, a Cluster node that stopped relaying) still
lands within it. An entry past that age is kept (until LRU or a notice drops it) as the last
good state: while Redis cannot resolve the key, it still says whether the key was known.
Entries are dropped by the keys-changed notices (:data:`sluice_core.keyschema.KEYS_CHANNEL`): one key's, or all of a policy's; and the
whole cache is emptied when the notices may have been missed (the subscription was lost and is
back) or the policy was reloaded with other tiers (a reload that keeps the policy's ref, tiers
and key source carries the cache over: ``Enforcement.carry_cache``).

A resolve in flight when a notice arrives may carry the grant as it was before the change: its
answer still serves the request that asked (it was read after the change was written, or before
the notice could be sent), but it is not cached. A resolve takes a :meth:`GrantCache.ticket`
when it is sent: the cache's ``epoch`` (whole-cache drops) and the drops of its own key, counted
in a small bounded map (one key's notices do not void the resolves of the others; when the map
overflows, the oldest count is forgotten and the epoch moves on, voiding every ticket: safe,
and rare); :meth:`GrantCache.put` refuses an answer whose ticket is no longer current.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final, Generic, TypeVar

from sluice_core.sidecar_settings import DEFAULT_GRANT_CACHE_MAX_AGE_S

B = TypeVar("B")
Ticket = tuple[int, int]  # (epoch, the key's drops): see the module docstring
MAX_DROPS = 4096  # keys whose drops are counted (recent notices); more: the epoch moves on


class Unknown:
    """The type of :data:`UNKNOWN` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = Unknown()
"""What :meth:`GrantCache.get` returns for a key known to have no grant."""


class GrantCache(Generic[B]):
    """Client id (``k`` + 16 characters, :func:`~sluice_core.keyschema.client_for_api_key`) to
    the bucket of its grant (``B``), or :data:`UNKNOWN`."""

    __slots__ = ("_drops", "_known", "_unknown", "epoch", "max_age_s", "size")

    def __init__(self, size: int, max_age_s: float = DEFAULT_GRANT_CACHE_MAX_AGE_S) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self.epoch = 0  # whole-cache drops so far (see the module docstring)
        self._drops: OrderedDict[str, int] = OrderedDict()  # client -> its drops (recent ones)
        # client -> (bucket, expires unix ms (0: never), stale at (monotonic s)). OrderedDict:
        # LRU order, O(1) at both ends.
        self._known: OrderedDict[str, tuple[B, int, float]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # client -> stale at

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    def get(self, client: str) -> B | Unknown | None:
        """The cached bucket of ``client``'s grant, :data:`UNKNOWN`, or None: not cached, its
        grant has expired, or the entry is older than ``max_age_s`` (kept for :meth:`last`)."""
        hit = self._known.get(client)
        if hit is not None:
            bucket, expires_ms, stale_at = hit
            if expires_ms and time.time() * 1000 >= expires_ms:
                del self._known[client]
                return None
            if time.monotonic() >= stale_at:
                return None
            self._known.move_to_end(client)
            return bucket
        stale = self._unknown.get(client)
        if stale is not None:
            if time.monotonic() >= stale:
                return None
            self._unknown.move_to_end(client)
            return UNKNOWN
        return None

    def last(self, client: str) -> B | Unknown | None:
        """What was last learnt of ``client``, however old (never past its grant's expiry): the
        last good state, for when Redis cannot resolve the key now."""
        hit = self._known.get(client)
        if hit is not None:
            bucket, expires_ms, _ = hit
            return None if expires_ms and time.time() * 1000 >= expires_ms else bucket
        return UNKNOWN if client in self._unknown else None

    def ticket(self, client: str) -> Ticket:
        """What a resolve of ``client`` records when it is sent, for :meth:`put`."""
        return self.epoch, self._drops.get(client, 0)

    def put(self, client: str, bucket: B | None, expires_ms: int, ticket: Ticket) -> None:
        """Remember what a resolve sent with ``ticket`` found (``bucket`` None: an unknown key)."""
        if ticket != self.ticket(client):
            return  # a notice came in meanwhile: this answer may predate it
        stale_at = time.monotonic() + self.max_age_s
        table: OrderedDict[str, tuple[B, int, float]] | OrderedDict[str, float]
        if bucket is None:
            self._known.pop(client, None)
            table = self._unknown
            self._unknown[client] = stale_at
        else:
            self._unknown.pop(client, None)
            table = self._known
            self._known[client] = (bucket, expires_ms, stale_at)
        table.move_to_end(client)
        if len(table) > self.size:
            table.popitem(last=False)

    def drop(self, client: str) -> None:
        """One key's grant was written or removed."""
        self._drops[client] = self._drops.get(client, 0) + 1
        self._drops.move_to_end(client)
        if len(self._drops) > MAX_DROPS:
            self._drops.popitem(last=False)
            self.epoch += 1  # that key's count restarts at 0: void every ticket instead
        self._known.pop(client, None)
        self._unknown.pop(client, None)

    def clear(self) -> None:
        """Many grants changed, or notices may have been missed."""
        self.epoch += 1
        self._drops.clear()
        self._known.clear()
        self._unknown.clear()
