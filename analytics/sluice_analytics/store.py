"""Applying a batch of usage windows: ONE SQL transaction per batch.

In it: the batch's ``(src, seq)`` pairs are inserted into ``usage_applied`` (``ON CONFLICT DO
NOTHING RETURNING``: the pairs returned are the windows not applied before; the others are
duplicates, skipped), then the new windows' rows, summed per key, are upserted into the
per-minute rollup, and into the hour / day rollups too when that period was already rolled up
(a late window). Either all of it commits or none: a window is counted exactly once, whatever
crashes around the commit (see docs/architecture.md, "The usage collector").

Deadlocks between replicas (PostgreSQL): every transaction takes its locks in one global order
(the rollup marks shared first, then the applied pairs sorted, then each table's rows sorted by
key), so no two can wait on each other in a cycle. On SQLite a transaction holds the file's
write lock from its start (``BEGIN IMMEDIATE``), so transactions simply queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sluice_core.usage import UsageWindow
from sqlalchemy import ColumnElement, Table, case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sluice_analytics import crashpoints
from sluice_analytics.schema import (
    COUNTERS,
    HISTOGRAM,
    KEY,
    MAXES,
    PERIODS,
    ROLLUPS,
    SUMS,
    usage_applied,
    usage_rollups,
)

Key = tuple[Any, ...]  # (ts, namespace, policy, client, tier, endpoint, outcome, status)


@dataclass
class Applied:
    """What one batch did."""

    windows: int = 0
    duplicates: int = 0
    stale: int = 0
    rows: int = 0  # rows upserted, all tables
    requests: int = 0  # decisions the applied windows represent


def insert_for(conn: AsyncConnection | AsyncEngine, table: Table) -> Any:
    """The dialect's INSERT (both have ``on_conflict_do_update`` and ``excluded``)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def merge_set(table: Table, excluded: Any) -> dict[str, ColumnElement[Any]]:
    """``ON CONFLICT DO UPDATE SET``: sums add, the maximum stays the larger, a histogram bucket
    adds with NULL as zero (``COALESCE(a + b, a, b)``: NULL only when both are)."""
    out: dict[str, ColumnElement[Any]] = {c: table.c[c] + excluded[c] for c in SUMS}
    for c in MAXES:
        out[c] = case((excluded[c] > table.c[c], excluded[c]), else_=table.c[c])
    for c in HISTOGRAM:
        out[c] = func.coalesce(table.c[c] + excluded[c], table.c[c], excluded[c])
    return out


async def upsert(conn: AsyncConnection, table: Table, rows: dict[Key, list[int]]) -> int:
    """Add ``rows`` (key → counters in :data:`COUNTERS` order) into ``table``, in key order."""
    if not rows:
        return 0
    stmt = insert_for(conn, table)
    stmt = stmt.on_conflict_do_update(index_elements=list(KEY), set_=merge_set(table, stmt.excluded))
    params = [dict(zip(KEY, key, strict=True))
              | {c: (v or None) if c in HISTOGRAM else v for c, v in zip(COUNTERS, counters, strict=True)}
              for key, counters in sorted(rows.items())]
    await conn.execute(stmt, params)
    return len(params)


def add_window(into: dict[Key, list[int]], window: UsageWindow, period: int) -> None:
    """Sum a window's rows into ``into`` under its period's start (the window's start)."""
    ts = window.start_ms // 1000 // period * period
    n_sums, n_max = len(SUMS), len(MAXES)
    for r in window.rows:
        key = (ts, window.namespace, *r.key)
        hist = [r.histogram.get(i, 0) for i in range(len(HISTOGRAM))]
        counters = [r.requests, r.tokens, r.latency_sum_us, r.latency_count, r.bytes_in, r.bytes_out,
                    r.latency_max_us, *hist]
        have = into.get(key)
        if have is None:
            into[key] = counters
            continue
        for i, v in enumerate(counters):
            have[i] = max(have[i], v) if n_sums <= i < n_sums + n_max else have[i] + v


async def rolled_until(conn: AsyncConnection) -> dict[str, int]:
    """Up to where hours and days are rolled up, read under a shared lock on PostgreSQL, so the
    rollup job (which locks them for update) never runs between this read and the commit."""
    q = select(usage_rollups.c.target, usage_rollups.c.done_until)
    if conn.dialect.name == "postgresql":
        q = q.order_by(usage_rollups.c.target).with_for_update(read=True)
    return {t: int(d) for t, d in (await conn.execute(q)).all()}


async def record_applied(conn: AsyncConnection, windows: Sequence[UsageWindow]) -> set[tuple[str, int]]:
    """Insert the windows' ``(src, seq)``; the pairs that were new."""
    pairs = sorted({(w.source, w.seq): w.end_ms // 1000 for w in windows}.items())
    if not pairs:
        return set()
    stmt = insert_for(conn, usage_applied).values(
        [{"src": s, "seq": q, "end_s": e} for (s, q), e in pairs])
    stmt = stmt.on_conflict_do_nothing(index_elements=["src", "seq"]).returning(
        usage_applied.c.src, usage_applied.c.seq)
    return {(s, int(q)) for s, q in (await conn.execute(stmt)).all()}


async def apply(engine: AsyncEngine, windows: Iterable[UsageWindow], *, now_s: float,
                keep_applied_s: float, crash: Callable[[str], None] = crashpoints.reach) -> Applied:
    """Apply a batch in one transaction (see the module's docstring)."""
    result = Applied()
    fresh: list[UsageWindow] = []
    for w in windows:
        # A window older than the applied-windows record may have been applied and forgotten:
        # refused and counted, never risked twice.
        if w.end_ms / 1000 < now_s - keep_applied_s:
            result.stale += 1
        else:
            fresh.append(w)
    async with engine.begin() as conn:
        marks = await rolled_until(conn)
        new = await record_applied(conn, fresh)
        per_table: dict[str, dict[Key, list[int]]] = {name: {} for name in ROLLUPS}
        seen: set[tuple[str, int]] = set()
        for w in fresh:
            pair = (w.source, w.seq)
            if pair not in new or pair in seen:
                result.duplicates += 1
                continue
            seen.add(pair)
            result.windows += 1
            result.requests += sum(r.requests for r in w.rows)
            start_s = w.start_ms // 1000
            for name, period in PERIODS.items():
                if name == "minute" or start_s // period * period < marks.get(name, -1):
                    add_window(per_table[name], w, period)
        for name, table in ROLLUPS.items():
            result.rows += await upsert(conn, table, per_table[name])
        crash("before_commit")
    return result

