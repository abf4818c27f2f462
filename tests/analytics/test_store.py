"""Applying batches of windows (store.apply) on SQLite and PostgreSQL: exact sums, duplicates
skipped, late windows reaching the rolled-up tables, concurrent writers without deadlock."""

from __future__ import annotations

import asyncio
import random

from sluice_analytics import database, rollup, store
from sluice_analytics.schema import usage_minute
from sluice_core.usage import UsageRow, UsageWindow
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from support.usage_windows import Writer, stored_histogram, stored_totals

NOW = 1_790_000_000 + 3600 * 6
KEEP = 3600 * 48


def never(_point: str) -> None:
    return None


async def test_batches_sum_exactly_and_duplicates_count_once(engine: AsyncEngine) -> None:
    writer = Writer(sources=5, clients=30)
    windows = writer.windows(8)
    first = await store.apply(engine, windows[:25], now_s=NOW, keep_applied_s=KEEP)
    # The rest, plus every window of the first batch again (a redelivery) and one twice in a batch.
    again = await store.apply(engine, windows[25:] + windows[:25] + windows[-1:], now_s=NOW, keep_applied_s=KEEP)
    assert (first.windows, first.duplicates) == (25, 0)
    assert (again.windows, again.duplicates) == (15, 26)
    assert await stored_totals(engine) == writer.totals
    assert await stored_histogram(engine) == writer.histogram


async def test_counters_merge_per_key(engine: AsyncEngine) -> None:
    def row(n: int, max_us: int, hist: dict[int, int]) -> UsageRow:
        return UsageRow("ns/p", "key:a", "free", "/x", "allowed", "2xx", n, 2 * n, n * 10, n, max_us, hist, n, n)

    start = (NOW - 600) * 1000
    a = UsageWindow("a", 0, "ns", start, start + 10_000, [row(3, 500, {1: 3})])
    b = UsageWindow("b", 0, "ns", start + 10_000, start + 20_000, [row(4, 200, {1: 1, 7: 3})])
    await store.apply(engine, [a], now_s=NOW, keep_applied_s=KEEP)
    await store.apply(engine, [b], now_s=NOW, keep_applied_s=KEEP)
    async with engine.connect() as conn:
        got = (await conn.execute(select(usage_minute))).mappings().one()
    assert (got["requests"], got["tokens"], got["latency_sum_us"], got["latency_max_us"]) == (7, 14, 70, 500)
    assert (got["h01"], got["h07"], got["h00"]) == (4, 3, None)  # an empty bucket stays NULL


async def test_stale_windows_are_refused_and_counted(engine: AsyncEngine) -> None:
    writer = Writer(start_ms=(NOW - KEEP - 60) * 1000)
    result = await store.apply(engine, writer.windows(1), now_s=NOW, keep_applied_s=KEEP)
    assert (result.windows, result.stale) == (0, writer.sources)
    assert await stored_totals(engine) == {}


async def test_a_late_window_reaches_the_rolled_up_tables(engine: AsyncEngine) -> None:
    writer = Writer(start_ms=(NOW - 5 * 3600) * 1000)
    early = writer.windows(2)
    await store.apply(engine, early, now_s=NOW, keep_applied_s=KEEP)
    retention = rollup.Retention({"minute": KEEP, "hour": 90 * 86400, "day": 400 * 86400}, KEEP)
    await rollup.run_once(engine, retention, now_s=NOW, delay_s=60)
    assert await stored_totals(engine, "hour") == writer.totals
    late = writer.windows(1, start_ms=(NOW - 5 * 3600 + 30) * 1000)
    await store.apply(engine, late, now_s=NOW, keep_applied_s=KEEP)
    assert await stored_totals(engine, "hour") == writer.totals
    assert await stored_totals(engine, "minute") == writer.totals


async def test_concurrent_writers_on_the_same_keys_are_exact(engine: AsyncEngine, database_url: str) -> None:
    """Four connections apply overlapping batches at once: the same minute and clients (every
    batch upserts the same rows, each worker's windows in its own order) and shared windows
    (duplicates across workers). No deadlock, every window once."""
    writer = Writer(sources=8, clients=5)
    windows = writer.windows(10, start_ms=(NOW - 600) * 1000)  # all in one minute
    engines = [database.connect(database_url) for _ in range(4)]
    try:
        async def worker(i: int) -> int:
            mine = windows[i::2] + windows[(i + 1) % 4::4]  # overlaps: duplicates across workers
            random.Random(i).shuffle(mine)
            applied = 0
            for k in range(0, len(mine), 10):
                applied += (await store.apply(engines[i], mine[k:k + 10], now_s=NOW, keep_applied_s=KEEP,
                                              crash=never)).windows
            return applied

        applied = await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(4))), 60)
    finally:
        for e in engines:
            await e.dispose()
    assert sum(applied) == len(windows)
    assert await stored_totals(engine) == writer.totals
