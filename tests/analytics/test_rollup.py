"""The rollup and retention job on SQLite and PostgreSQL: hours and days equal the minutes they
summarise, a rerun adds nothing, retention deletes exactly the expired periods (and never a
period not rolled up yet), the applied-windows record is pruned by age."""

from __future__ import annotations

from sluice_analytics import rollup, store
from sluice_analytics.schema import ROLLUPS, usage_applied
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from support.usage_windows import Writer, stored_histogram, stored_totals

DAY = 86400
T0 = 1_790_000_000 // DAY * DAY  # a midnight
KEEP = {"minute": 48 * 3600, "hour": 90 * DAY, "day": 400 * DAY}
RETENTION = rollup.Retention(KEEP, keep_applied_s=48 * 3600, delete_batch=1000)


async def _count(engine: AsyncEngine, table: str, where: object = None) -> int:
    t = ROLLUPS.get(table, usage_applied)
    q = select(func.count()).select_from(t)
    if where is not None:
        q = q.where(where)  # type: ignore[arg-type]
    async with engine.connect() as conn:
        return int((await conn.execute(q)).scalar() or 0)


async def _apply_days(engine: AsyncEngine, writer: Writer, days: range, now_s: int) -> None:
    for d in days:
        for hour in (1, 13):
            ws = writer.windows(1, start_ms=(T0 + d * DAY + hour * 3600 + 5) * 1000)
            await store.apply(engine, ws, now_s=now_s, keep_applied_s=10**9)


async def test_rollups_equal_the_minutes_and_reruns_add_nothing(engine: AsyncEngine) -> None:
    writer = Writer(sources=3)
    now = T0 + 3 * DAY + 600
    await _apply_days(engine, writer, range(3), now)
    keep_all = rollup.Retention({t: 1000 * DAY for t in KEEP}, keep_applied_s=1000 * DAY)
    first = await rollup.run_once(engine, keep_all, now_s=now, delay_s=120)
    assert first.rolled == {"hour": 71, "day": 3}  # from the first hour with data (01:00) to the last closed
    for _ in range(2):
        again = await rollup.run_once(engine, keep_all, now_s=now, delay_s=120)
        assert again.rolled == {"hour": 0, "day": 0}
    for table in ("minute", "hour", "day"):
        assert await stored_totals(engine, table) == writer.totals, table
        assert await stored_histogram(engine, table) == writer.histogram, table


async def test_retention_deletes_what_it_should(engine: AsyncEngine) -> None:
    writer = Writer(sources=2)
    now = T0 + 10 * DAY + 600  # day 9 closed (and past the rollup delay)
    await _apply_days(engine, writer, range(10), now)  # days 0..9, two windows per source a day
    first = await rollup.run_once(engine, RETENTION, now_s=now, delay_s=120)
    assert first.rolled["hour"] == rollup.MAX_PERIODS_PER_RUN["hour"]  # a backlog: a week per run
    while sum((await rollup.run_once(engine, RETENTION, now_s=now, delay_s=120)).rolled.values()):
        pass
    minute = ROLLUPS["minute"].c.ts
    # minutes: kept 48 h, so days 8 and 9 only; hours and days: all (within 90 / 400 days)
    assert await _count(engine, "minute", minute < now - KEEP["minute"]) == 0
    assert await _count(engine, "minute") > 0
    assert await stored_totals(engine, "hour") == writer.totals
    assert await stored_totals(engine, "day") == writer.totals
    applied = await _count(engine, "applied")
    assert applied == 2 * 2 * 2  # windows ending in the last 48 h: days 8 and 9
    # 400 days later everything is gone, a bounded batch at a time
    later = now + 401 * DAY
    small = rollup.Retention(KEEP, keep_applied_s=48 * 3600, delete_batch=5)
    runs = 0
    while await _count(engine, "day") or await _count(engine, "hour") or await _count(engine, "minute"):
        result = await rollup.run_once(engine, small, now_s=later, delay_s=120)
        assert all(n <= 5 for n in result.deleted.values())
        runs += 1
        assert runs < 200
    assert await _count(engine, "applied") == 0


async def test_minutes_not_rolled_up_are_kept(engine: AsyncEngine) -> None:
    """Retention of the minute table waits for the hour rollup: a collector that was down for
    three days loses no minute it never rolled up."""
    writer = Writer(sources=1)
    now = T0 + 3 * DAY
    await _apply_days(engine, writer, range(1), now)
    cutoffs = await rollup.retention_cutoffs(engine, RETENTION, now)
    assert cutoffs["minute"] == 0  # nothing rolled up yet: nothing may go
    await rollup.run_once(engine, RETENTION, now_s=now, delay_s=120)
    assert await stored_totals(engine, "hour") == writer.totals
    assert await _count(engine, "minute") == 0
