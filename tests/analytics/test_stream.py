"""The usage stream's consumer group against a real Redis: own pending entries first, entries
another consumer left idle claimed, trimmed entries acknowledged, the lag in entries and age."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from sluice_analytics.stream import UsageStream
from sluice_core import configstore
from support.polling import wait_for
from support.redis_servers import RedisServer


def _stream(server: RedisServer, key: str, consumer: str, idle_s: float = 60) -> UsageStream:
    return UsageStream(configstore.connect(server.url), consumer, block_ms=10, claim_idle_s=idle_s, key=key)


async def test_lag_counts_undelivered_and_pending_entries(redis_server: RedisServer) -> None:
    key = f"test:{{usage}}:{uuid.uuid4().hex}"
    s = _stream(redis_server, key, "a")
    try:
        await s.ensure_group()
        assert (await s.lag()).entries == 0
        for i in range(5):
            await s.redis.xadd(key, {"n": str(i)})
        lag = await s.lag()
        assert lag.entries == 5 and lag.seconds >= 0
        s._own_pending = False
        got = await s.read(2)
        assert len(got) == 2
        assert (await s.lag()).entries == 5  # 3 undelivered + 2 pending
        await s.ack([i for i, _ in got])
        assert (await s.lag()).entries == 3
    finally:
        await s.client.aclose()


async def test_pending_entries_are_read_again_then_claimed(redis_server: RedisServer) -> None:
    key = f"test:{{usage}}:{uuid.uuid4().hex}"
    a, b = _stream(redis_server, key, "a"), _stream(redis_server, key, "b", idle_s=0.0001)  # min idle 0 ms: claims at once
    try:
        await a.ensure_group()
        ids = [await a.redis.xadd(key, {"n": str(i)}) for i in range(3)]
        first = await a.read(10)  # nothing pending yet: new entries
        assert [i for i, _ in first] == [i.decode() for i in ids]
        again = _stream(redis_server, key, "a")  # "a" restarted: its pending entries first
        assert [i for i, _ in await again.read(10)] == [i.decode() for i in ids]
        await again.client.aclose()
        b._own_pending = False  # "a" died: "b" claims its entries once idle
        assert [i for i, _ in await b.read(10)] == [i.decode() for i in ids]
        await a.redis.xtrim(key, maxlen=0)  # trimmed while pending: acknowledged, not returned
        c = _stream(redis_server, key, "c", idle_s=0.0001)  # min idle 0 ms: claims at once
        c._own_pending = False
        assert await c.read(10) == []
        assert (await c.redis.xpending(key, "sluice-analytics"))["pending"] == 0
        await c.client.aclose()
    finally:
        await a.client.aclose()
        await b.client.aclose()


async def test_trim_removes_only_what_every_group_acknowledged(redis_server: RedisServer) -> None:
    """Entries pending with any consumer (a dead one's too), or not yet delivered to some
    group, stay; what every group acknowledged goes."""
    key = f"test:{{usage}}:{uuid.uuid4().hex}"
    a, b = _stream(redis_server, key, "a"), _stream(redis_server, key, "b")
    other = UsageStream(configstore.connect(redis_server.url), "x", block_ms=10, claim_idle_s=60, key=key,
                        group="another-reader")
    try:
        assert await a.trim() == 0  # no stream yet
        ids = [(await a.redis.xadd(key, {"n": str(i)})).decode() for i in range(10)]
        assert await a.trim() == 0  # no group: only MAXLEN bounds it
        await a.ensure_group()
        await other.ensure_group()
        for s in (a, b, other):
            s._own_pending = False
        held_by_b = await b.read(3)  # b "dies" holding 0..2
        mine = await a.read(5)  # a applies 3..7
        await a.ack([i for i, _ in mine])
        assert await a.trim() == 0  # 0..2 pending with b; and the other group read nothing
        await other.ack([i for i, _ in await other.read(10)])  # the other group is done with all 10
        assert await a.trim() == 0  # b's pending entries are still the oldest needed
        await b.ack([i for i, _ in held_by_b])  # claimed and applied, here by b itself
        assert await a.trim() == 8  # 0..7 acknowledged by both groups; 8, 9 never delivered to ours
        assert [i.decode() for i, _ in await a.redis.xrange(key)] == ids[8:]
        await a.ack([i for i, _ in await a.read(10)])
        assert await a.trim() == 2
        assert await a.redis.xlen(key) == 0
        assert (await a.lag()).entries == 0
        await a.redis.xadd(key, {"n": "10"})  # new entries after an emptied stream still come
        assert [f for _, f in await a.read(10)] == [{b"n": b"10"}]
    finally:
        for s in (a, b, other):
            await s.client.aclose()


async def test_gone_consumers_with_nothing_pending_are_forgotten(redis_server: RedisServer) -> None:
    """Each restarted collector pod joins the group under a new name: the ones idle past the
    bound with nothing pending are deleted; one with pending entries (left for XAUTOCLAIM), a
    busy one and the caller itself stay. (A live but quiet replica deleted with nothing pending
    loses nothing: its next read joins the group again.)"""
    key = f"test:{{usage}}:{uuid.uuid4().hex}"
    bound_s = 3.0  # a busy consumer reads right before the forget: far under it even on a loaded machine
    me, gone, holding, busy = (_stream(redis_server, key, name) for name in ("me", "gone", "holding", "busy"))
    streams = (me, gone, holding, busy)
    try:
        assert await me.forget_idle_consumers(bound_s) == []  # no stream, no group: nothing
        await me.ensure_group()
        for s in streams:
            s._own_pending = False
        for s in (me, gone):  # read and acknowledged: nothing pending
            await me.redis.xadd(key, {"n": s.consumer})
            await s.ack([i for i, _ in await s.read(10)])
        await me.redis.xadd(key, {"n": "held"})
        assert len(await holding.read(10)) == 1  # died holding an unacknowledged entry

        async def idle_ms() -> dict[str, int]:
            return {c["name"].decode(): int(c["idle"]) for c in await me.redis.xinfo_consumers(key, "sluice-analytics")}

        await wait_for(lambda: _all_past(idle_ms, ("me", "gone", "holding"), bound_s * 1000),
                       timeout=30, what="three consumers idle past the bound")
        await me.redis.xadd(key, {"n": "busy"})
        await busy.ack([i for i, _ in await busy.read(10)])  # a live replica, reading now
        assert await me.forget_idle_consumers(bound_s) == ["gone"]
        assert set(await idle_ms()) == {"me", "holding", "busy"}
        assert (await me.redis.xpending(key, "sluice-analytics"))["pending"] == 1  # holding's entry kept
        assert await me.forget_idle_consumers(bound_s) == []
    finally:
        for s in streams:
            await s.client.aclose()


async def _all_past(idle_ms: Callable[[], Awaitable[dict[str, int]]], names: tuple[str, ...], bound_ms: float) -> bool:
    idle = await idle_ms()
    return all(idle.get(n, 0) > bound_ms for n in names)
