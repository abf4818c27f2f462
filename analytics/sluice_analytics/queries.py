"""The questions the analytics API answers, as SQL (SQLAlchemy Core, the same on SQLite and
PostgreSQL), each bounded so that one call cannot scan the world.

Which table: the coarsest rollup whose period divides the range's start, end (and the series'
step). A coarser table holds only what was rolled up (``usage_rollups.done_until``), so a range is
read as slices: the coarse table before its mark, the next finer one up to its own mark, the
minute table after (the minute table keeps 48 h, and the rollup runs minutes behind, so the
slices always meet). The rows of the slices are summed in one ``UNION ALL`` subquery.

Bounds (checked by :mod:`sluice_analytics.params` before any SQL runs): a range covers at most
:data:`MAX_PERIODS` periods of the table read, a series has at most :data:`MAX_POINTS` points and
a list at most :data:`MAX_LIMIT` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice_core.usage import quantile_us
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    case,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics.schema import HISTOGRAM, PERIODS, ROLLUPS, usage_minute, usage_rollups

MAX_PERIODS = 2880
"""The most periods of one table a query covers: 48 h of minutes, 120 days of hours, and (the
day table's retention being 400 days) every day kept."""
MAX_POINTS = 1000
MAX_LIMIT = 1000
MAX_LIMITED_MINUTES = 60
LIMITED = "limited"

COLUMNS = ("namespace", "policy", "client", "tier", "endpoint", "outcome", "status",
           "requests", "tokens", "latency_sum_us", "latency_count", "bytes_in", "bytes_out", *HISTOGRAM)


def table_for(start: int, end: int, step: int | None = None) -> str:
    """The coarsest rollup whose period divides ``start``, ``end`` (and ``step``)."""
    for name in ("day", "hour", "minute"):
        p = PERIODS[name]
        if start % p == 0 and end % p == 0 and (step is None or step % p == 0):
            return name
    return "minute"


@dataclass(frozen=True)
class Filter:
    namespace: str
    policy: str | None = None
    client: str | None = None
    endpoint: str | None = None
    outcome: str | None = None


async def marks(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(usage_rollups.c.target, usage_rollups.c.done_until))).all()
    return {t: int(d) for t, d in rows}


def slices(table: str, start: int, end: int, done: dict[str, int]) -> list[tuple[str, int, int]]:
    """``[start, end)`` as (table, lo, hi) pieces: coarse before its rollup mark, finer after."""
    order = ("day", "hour", "minute")
    out: list[tuple[str, int, int]] = []
    lo = start
    for name in order[order.index(table):]:
        hi = end if name == "minute" else min(end, max(lo, done.get(name, -1)))
        if hi > lo:
            out.append((name, lo, hi))
        lo = max(lo, hi)
    return out


def _rows(flt: Filter, pieces: Sequence[tuple[str, int, int]]) -> Any:
    """The matching rows of every piece, one subquery with :data:`COLUMNS` and ``ts``."""
    parts: list[Select[Any]] = []
    for name, lo, hi in pieces:
        t = ROLLUPS[name]
        conds: list[ColumnElement[bool]] = [t.c.ts >= lo, t.c.ts < hi, t.c.namespace == flt.namespace]
        for col in ("policy", "client", "endpoint", "outcome"):
            value = getattr(flt, col)
            if value is not None:
                conds.append(t.c[col] == value)
        parts.append(select(t.c.ts, *(t.c[c] for c in COLUMNS)).where(and_(*conds)))
    if not parts:  # an empty range: a subquery with no rows, same columns
        t = usage_minute
        parts.append(select(t.c.ts, *(t.c[c] for c in COLUMNS)).where(literal(False)))
    return (parts[0] if len(parts) == 1 else union_all(*parts)).subquery("r")


def _limited(r: Any) -> ColumnElement[Any]:
    return func.sum(case((r.c.outcome == LIMITED, r.c.requests), else_=0))


async def series(engine: AsyncEngine, flt: Filter, start: int, end: int, step: int) -> dict[str, Any]:
    table = table_for(start, end, step)
    r = _rows(flt, slices(table, start, end, await marks(engine)))
    point = literal(start, BigInteger) + (r.c.ts - start) // step * step  # BIGINT: past 2038 too
    q = (select(point.label("t"), r.c.outcome, func.sum(r.c.requests), func.sum(r.c.tokens))
         .group_by(point, r.c.outcome).order_by(point, r.c.outcome))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    totals = {t: [0, 0] for t in range(start, end, step)}
    outcomes: dict[int, dict[str, int]] = {t: {} for t in totals}
    for t, outcome, n, tokens in rows:
        totals[int(t)][0] += int(n)
        totals[int(t)][1] += int(tokens)
        outcomes[int(t)][outcome] = int(n)
    return {"table": table, "points": [{"t": t, "requests": n, "tokens": k, "outcomes": outcomes[t]}
                                       for t, (n, k) in totals.items()]}


BY = {"requests": "requests", "limited": "limited", "tokens": "tokens"}


async def top(engine: AsyncEngine, flt: Filter, start: int, end: int, by: str, limit: int) -> list[dict[str, Any]]:
    r = _rows(flt, slices(table_for(start, end), start, end, await marks(engine)))
    requests, limited, tokens = (func.sum(r.c.requests).label("requests"), _limited(r).label("limited"),
                                 func.sum(r.c.tokens).label("tokens"))
    order = {"requests": requests, "limited": limited, "tokens": tokens}[by]
    q = (select(r.c.client, requests, limited, tokens).group_by(r.c.client)
         .order_by(order.desc(), r.c.client).limit(limit))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"client": c, "requests": int(n), "limited": int(lim), "tokens": int(t)} for c, n, lim, t in rows]


async def endpoints(engine: AsyncEngine, flt: Filter, start: int, end: int, limit: int) -> list[dict[str, Any]]:
    r = _rows(flt, slices(table_for(start, end), start, end, await marks(engine)))
    q = (select(r.c.endpoint, func.sum(r.c.requests).label("n"), _limited(r), func.sum(r.c.tokens),
                func.sum(r.c.latency_sum_us), func.sum(r.c.latency_count),
                *(func.sum(r.c[h]) for h in HISTOGRAM))
         .group_by(r.c.endpoint).order_by(func.sum(r.c.requests).desc(), r.c.endpoint).limit(limit))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    out = []
    for endpoint, n, lim, tokens, lat_sum, lat_count, *hist in rows:
        h = {i: int(v) for i, v in enumerate(hist) if v}
        out.append({"endpoint": endpoint, "requests": int(n), "limited": int(lim), "tokens": int(tokens),
                    "latency_avg_us": (int(lat_sum) // int(lat_count)) if lat_count else None,
                    **{f"latency_p{q}_us": _q(h, q / 100) for q in (50, 95, 99)}})
    return out


def _q(h: dict[int, int], q: float) -> int | None:
    v = quantile_us(h, q)
    return None if v is None else round(v)


async def client_usage(engine: AsyncEngine, flt: Filter, start: int, end: int) -> dict[str, Any]:
    r = _rows(flt, slices(table_for(start, end), start, end, await marks(engine)))
    q = (select(r.c.policy, r.c.tier, r.c.outcome, func.sum(r.c.requests), func.sum(r.c.tokens),
                func.sum(r.c.bytes_in), func.sum(r.c.bytes_out))
         .group_by(r.c.policy, r.c.tier, r.c.outcome).order_by(r.c.policy, r.c.tier, r.c.outcome))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    total = {"requests": 0, "tokens": 0, "bytes_in": 0, "bytes_out": 0}
    outcomes: dict[str, int] = {}
    breakdown = []
    for policy, tier, outcome, n, tokens, b_in, b_out in rows:
        for k, v in zip(total, (n, tokens, b_in, b_out), strict=True):
            total[k] += int(v)
        outcomes[outcome] = outcomes.get(outcome, 0) + int(n)
        breakdown.append({"policy": policy, "tier": tier, "outcome": outcome, "requests": int(n),
                          "tokens": int(tokens)})
    return {**total, "outcomes": outcomes, "breakdown": breakdown}


async def limited_now(engine: AsyncEngine, flt: Filter, since: int, limit: int) -> list[dict[str, Any]]:
    """Who was refused since ``since`` (the minute table only: the last minutes), with the
    policy, tier and endpoint (the rule) that refused them."""
    t = usage_minute
    conds = [t.c.ts >= since, t.c.namespace == flt.namespace, t.c.outcome == LIMITED]
    if flt.policy is not None:
        conds.append(t.c.policy == flt.policy)
    n = func.sum(t.c.requests)
    q = (select(t.c.client, t.c.policy, t.c.tier, t.c.endpoint, n, func.max(t.c.ts))
         .where(and_(*conds)).group_by(t.c.client, t.c.policy, t.c.tier, t.c.endpoint)
         .order_by(n.desc(), t.c.client, t.c.policy, t.c.tier, t.c.endpoint).limit(limit))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [{"client": c, "policy": p, "tier": tier, "endpoint": e, "limited": int(k), "last_minute": int(ts)}
            for c, p, tier, e, k, ts in rows]


REPORT_COLUMNS = ("day", "namespace", "policy", "client", "tier", "requests", "allowed", "limited",
                  "tokens", "bytes_in", "bytes_out")


async def report(engine: AsyncEngine, flt: Filter, start: int, end: int) -> list[tuple[Any, ...]]:
    """Per client per day (UTC) over whole days ``[start, end)``: the billing report's rows."""
    r = _rows(flt, slices("day", start, end, await marks(engine)))
    day = r.c.ts // 86400 * 86400
    q = (select(day, r.c.namespace, r.c.policy, r.c.client, r.c.tier, func.sum(r.c.requests),
                func.sum(case((r.c.outcome == "allowed", r.c.requests), else_=0)), _limited(r),
                func.sum(r.c.tokens), func.sum(r.c.bytes_in), func.sum(r.c.bytes_out))
         .group_by(day, r.c.namespace, r.c.policy, r.c.client, r.c.tier)
         .order_by(day, r.c.namespace, r.c.policy, r.c.client, r.c.tier))
    async with engine.connect() as conn:
        return [tuple(int(v) if i == 0 or i >= 5 else v for i, v in enumerate(row))
                for row in (await conn.execute(q)).all()]
