"""The usage stream through a consumer group (redis-py asyncio; single, Sentinel or Cluster).

Every replica joins the group :data:`~sluice_core.keyschema.USAGE_GROUP` under its consumer
name. What it reads, in this order:

1. its own pending entries (``XREADGROUP … 0``): delivered to it before a restart and never
   acknowledged (it died before or after its commit; the applied-windows record sorts out
   which);
2. entries any consumer left pending longer than ``claim_idle_s`` (``XAUTOCLAIM``): a replica
   that died and did not come back;
3. new entries (``XREADGROUP … >``, blocking at most ``block_ms``).

An entry is acknowledged (``XACK``) only after its batch committed. The group is created with
``MKSTREAM`` from the stream's start, and again whenever Redis says it is gone (a Redis
restarted without persistence).

``XACK`` deletes nothing: after each acknowledged batch, :meth:`UsageStream.trim` removes the
entries every consumer group is done with (``scripts/trim_usage.lua``: ``XTRIM MINID`` to the
oldest entry any group still has pending, with any consumer, or has not yet been delivered).
So with a live collector the stream holds only what is unconsumed, whatever
``--usage-stream-maxlen`` allows; a dead replica's pending entries stay until claimed and
acknowledged; another group on the stream keeps what it has not read. ``XDEL`` of the
acknowledged ids would be simpler but would take entries from under any other group.

Consumers are forgotten too: each restarted collector pod joins under a new name, and a group
keeps every consumer it ever had. :meth:`UsageStream.forget_idle_consumers` deletes the others
that have nothing pending and were idle longer than ``--forget-consumers-idle-h`` (a live
replica's reads keep it busy every ``block_ms``; one with pending entries waits for
``XAUTOCLAIM`` to take them first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError
from sluice_core import keyschema, scripts
from sluice_core.configstore import Client

REJECTED_MAXLEN = 10_000
Fields = dict[bytes | str, bytes | str]
Entry = tuple[str, Fields]


@dataclass
class Lag:
    entries: int  # not yet delivered to the group, plus delivered and not acknowledged
    seconds: float  # age of the oldest of those (0 when none)


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class UsageStream:
    def __init__(self, client: Client, consumer: str, *, block_ms: int, claim_idle_s: float,
                 key: str = keyschema.USAGE_STREAM_KEY, group: str = keyschema.USAGE_GROUP) -> None:
        self.client, self.consumer, self.key, self.group = client, consumer, key, group
        self.block_ms, self.claim_idle_ms = block_ms, int(claim_idle_s * 1000)
        self._own_pending = True  # at start, and after the group was recreated
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    @property
    def redis(self) -> Any:
        return self.client.redis

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int) -> list[Entry]:
        """The next batch (maybe empty after ``block_ms``); creates the group when missing."""
        try:
            return await self._read(count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            self._own_pending, self._claim_cursor = True, "0-0"
            return await self._read(count)

    async def _read(self, count: int) -> list[Entry]:
        if self._own_pending:
            got = await self._group_read("0", count, block=None)
            # Entries trimmed from the stream while pending come back without fields: acknowledge.
            dead = [i for i, f in got if not f]
            if dead:
                await self.ack(dead)
            got = [(i, f) for i, f in got if f]
            if got or dead:
                return got
            self._own_pending = False
        if time.monotonic() >= self._next_claim:
            claimed = await self._claim(count)
            if claimed:
                return claimed
            self._next_claim = time.monotonic() + self.claim_idle_ms / 4000
        return await self._group_read(">", count, block=self.block_ms)

    async def _group_read(self, start: str, count: int, *, block: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.key: start}, count=count,
                                            block=block)
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries.extend((_text(i), dict(f or {})) for i, f in items)
        return entries

    async def _claim(self, count: int) -> list[Entry]:
        reply = await self.redis.xautoclaim(self.key, self.group, self.consumer, self.claim_idle_ms,
                                            start_id=self._claim_cursor, count=count)
        cursor, items = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # pending entries already trimmed from the stream: nothing to apply
            await self.ack([_text(i) for i in deleted])
        self._claim_cursor = _text(cursor)
        return [(_text(i), dict(f)) for i, f in items if f]

    def retry_pending(self) -> None:
        """Read this consumer's pending entries again first (a batch that was not applied)."""
        self._own_pending = True

    async def ack(self, ids: list[str]) -> None:
        if ids:
            await self.redis.xack(self.key, self.group, *ids)

    async def trim(self) -> int:
        """Remove the entries every group has acknowledged; the number removed."""
        s = scripts.trim_usage()
        return int(await self.redis.eval(s.source, 1, self.key))

    async def forget_idle_consumers(self, idle_s: float) -> list[str]:
        """Delete the other consumers of the group with nothing pending that were idle longer
        than ``idle_s`` (replicas gone for good; ``scripts/forget_consumers.lua``); their names."""
        s = scripts.forget_consumers()
        gone = await self.redis.eval(s.source, 1, self.key, self.group, str(int(idle_s * 1000)), self.consumer)
        return [_text(n) for n in gone or []]

    async def reject(self, entry_id: str, fields: Fields, reason: str) -> None:
        """Keep a bad entry aside (bounded stream) and acknowledge it, in one transaction."""
        kept: dict[Any, Any] = {b"id": entry_id.encode(), b"reason": reason.encode()[:1024]}
        kept.update({b"f:" + (k if isinstance(k, bytes) else k.encode()): v for k, v in fields.items()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keyschema.USAGE_REJECTED_KEY, kept, maxlen=REJECTED_MAXLEN, approximate=True)
            pipe.xack(self.key, self.group, entry_id)
            await pipe.execute()

    async def lag(self) -> Lag:
        """How far the group is behind: entries and the age of the oldest of them."""
        groups = await self.redis.xinfo_groups(self.key)
        info = next((g for g in groups if _text(g.get("name")) == self.group), None)
        if info is None:
            return Lag(0, 0.0)
        pending, behind = int(info.get("pending") or 0), info.get("lag")
        undelivered = int(behind) if behind is not None else 0
        oldest_ms: int | None = None
        if pending:
            summary = await self.redis.xpending(self.key, self.group)
            if summary.get("min"):
                oldest_ms = _id_ms(_text(summary["min"]))
        if oldest_ms is None and undelivered:
            first = await self.redis.xrange(self.key, min="(" + _text(info["last-delivered-id"]), count=1)
            if first:
                oldest_ms = _id_ms(_text(first[0][0]))
        age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms is not None else 0.0
        return Lag(pending + undelivered, age)
