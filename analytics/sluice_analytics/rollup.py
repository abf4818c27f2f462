"""The rollup and retention job: idempotent and cheap, safe to run from every replica at once.

Rollup: ``usage_rollups`` says up to where hours (days) are rolled up (``done_until``). A run
rolls up only the periods that closed since (ended at least ``delay`` ago), with one
``INSERT … SELECT … GROUP BY`` from the finer table, and moves the mark, in one transaction
that holds the mark's row lock (PostgreSQL ``FOR UPDATE``; SQLite ``BEGIN IMMEDIATE``): a second
replica waits, then finds nothing left to do. A window arriving for a period already rolled up
is added to the coarser tables by the batch that applies it (:mod:`sluice_analytics.store`).

Retention: a table keeps its rows for its ``keep``; older ones go one period (one ``ts``) per
transaction, at most ``delete_batch`` periods per run, so a run's transactions stay small
whatever the backlog. A finer table's rows go only once rolled up. ``usage_applied`` is pruned
the same way, by the windows' end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sluice_analytics.schema import (
    COUNTERS,
    KEY,
    MAXES,
    PERIODS,
    ROLLUPS,
    usage_applied,
    usage_rollups,
)
from sluice_analytics.store import insert_for, merge_set

MAX_PERIODS_PER_RUN = {"hour": 24 * 7, "day": 31}
"""How far one run rolls up (a week of hours, a month of days): a long backlog is caught up over
a few runs in bounded transactions."""


@dataclass(frozen=True)
class Retention:
    keep_s: dict[str, float]  # per rollup table name
    keep_applied_s: float
    delete_batch: int = 50


@dataclass
class RunResult:
    rolled: dict[str, int] = field(default_factory=dict)  # periods rolled up per table
    deleted: dict[str, int] = field(default_factory=dict)  # periods (or applied slices) deleted


async def _mark(conn: AsyncConnection, target: str) -> int | None:
    q = select(usage_rollups.c.done_until).where(usage_rollups.c.target == target)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    value = (await conn.execute(q)).scalar()
    return None if value is None else int(value)


async def roll_up(engine: AsyncEngine, target: str, *, now_s: float, delay_s: float) -> int:
    """Roll up the closed periods of ``target`` ("hour" or "day") not rolled up yet; how many."""
    period = PERIODS[target]
    source_name = "minute" if target == "hour" else "hour"
    source, dest = ROLLUPS[source_name], ROLLUPS[target]
    async with engine.begin() as conn:
        done = await _mark(conn, target)
        start = done
        if start is None:  # first run: from the oldest row there is
            oldest = (await conn.execute(select(func.min(source.c.ts)))).scalar()
            if oldest is None:
                return 0
            start = int(oldest) // period * period
        closed = int(now_s - delay_s) // period * period
        if target == "day":  # a day is rolled up from hours: only from hours already rolled up
            closed = min(closed, (await _mark(conn, "hour") or 0) // period * period)
        until = min(closed, start + MAX_PERIODS_PER_RUN[target] * period)
        if until <= start:
            return 0
        bucket = (source.c.ts - source.c.ts % period).label("ts")
        sums = [(func.max(source.c[c]) if c in MAXES else func.sum(source.c[c])).label(c) for c in COUNTERS]
        rows = (select(bucket, *(source.c[k] for k in KEY[1:]), *sums)
                .where(source.c.ts >= start, source.c.ts < until)
                .group_by(bucket, *(source.c[k] for k in KEY[1:])))
        stmt = insert_for(conn, dest).from_select([*KEY, *COUNTERS], rows)
        # Nothing is there to merge with (periods past the mark get rows only from here); the
        # upsert keeps a rerun after a lost commit reply from failing, and adds nothing then
        # because the mark moved in the same transaction.
        await conn.execute(stmt.on_conflict_do_update(index_elements=list(KEY),
                                                      set_=merge_set(dest, stmt.excluded)))
        if done is None:
            await conn.execute(insert_for(conn, usage_rollups).values(target=target, done_until=until, runs=1))
        else:
            await conn.execute(update(usage_rollups).where(usage_rollups.c.target == target)
                               .values(done_until=until, runs=usage_rollups.c.runs + literal(1)))
    return (until - start) // period


async def _delete_oldest(engine: AsyncEngine, table: str, cutoff: int) -> bool:
    """Delete the oldest period of ``table`` if it starts before ``cutoff``; whether it did."""
    t = ROLLUPS.get(table, usage_applied)
    col = t.c.ts if table in ROLLUPS else t.c.end_s
    async with engine.begin() as conn:
        oldest = (await conn.execute(select(func.min(col)))).scalar()
        if oldest is None or oldest >= cutoff:
            return False
        # The applied record has no periods: a minute of windows' ends at a time.
        hi = oldest + 1 if table in ROLLUPS else min(cutoff, oldest + 60)
        await conn.execute(t.delete().where(col >= oldest, col < hi))
    return True


async def retention_cutoffs(engine: AsyncEngine, retention: Retention, now_s: float) -> dict[str, int]:
    """Per table, the ``ts`` before which rows go: its age limit, but never a period that is
    not rolled up into the next table yet."""
    async with engine.connect() as conn:
        marks = {t: int(d) for t, d in (await conn.execute(
            select(usage_rollups.c.target, usage_rollups.c.done_until))).all()}
    nxt = {"minute": "hour", "hour": "day"}
    out = {}
    for name in ROLLUPS:
        cutoff = int(now_s - retention.keep_s[name])
        if name in nxt:
            cutoff = min(cutoff, marks.get(nxt[name], 0))
        out[name] = cutoff
    out["applied"] = int(now_s - retention.keep_applied_s)
    return out


async def run_once(engine: AsyncEngine, retention: Retention, *, now_s: float, delay_s: float) -> RunResult:
    """One pass: roll up hours then days, then retention on every table."""
    result = RunResult()
    for target in ("hour", "day"):
        result.rolled[target] = await roll_up(engine, target, now_s=now_s, delay_s=delay_s)
    cutoffs = await retention_cutoffs(engine, retention, now_s)
    for table, cutoff in cutoffs.items():
        n = 0
        while n < retention.delete_batch and await _delete_oldest(engine, table, cutoff):
            n += 1
        result.deleted[table] = n
    return result
