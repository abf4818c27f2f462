"""What the dashboard's overview cards and consumer table read (``GET /v1/overview``), as SQL
over the same rollup slices as :mod:`sluice_analytics.queries`: totals of a range (requests per
outcome and per upstream status class, average and p95 upstream latency, distinct clients) and
the tiers the top consumers were counted under. Bounded like the API's other reads: one
aggregate row, one row per outcome × status, and the tiers of at most ``limit`` clients.
"""

from __future__ import annotations

from typing import Any

from sluice_core.usage import quantile_us
from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics.queries import Filter, _rows, marks, slices, table_for
from sluice_analytics.schema import HISTOGRAM

SUCCESS = ("2xx", "3xx")
"""What counts as a success: the upstream answered 2xx or 3xx (a 429 of the sidecar never
reached it: status ``none``)."""


async def totals(engine: AsyncEngine, flt: Filter, start: int, end: int) -> dict[str, Any]:
    r = _rows(flt, slices(table_for(start, end), start, end, await marks(engine)))
    per = (select(r.c.outcome, r.c.status, func.sum(r.c.requests), func.sum(r.c.tokens))
           .group_by(r.c.outcome, r.c.status))
    agg = select(func.count(distinct(r.c.client)), func.sum(r.c.latency_sum_us), func.sum(r.c.latency_count),
                 *(func.sum(r.c[h]) for h in HISTOGRAM))
    async with engine.connect() as conn:
        rows = (await conn.execute(per)).all()
        clients, lat_sum, lat_count, *hist = (await conn.execute(agg)).one()
    outcomes: dict[str, int] = {}
    statuses: dict[str, int] = {}
    requests = tokens = 0
    for outcome, status, n, k in rows:
        outcomes[outcome] = outcomes.get(outcome, 0) + int(n)
        statuses[status] = statuses.get(status, 0) + int(n)
        requests += int(n)
        tokens += int(k)
    h = {i: int(v) for i, v in enumerate(hist) if v}
    p95 = quantile_us(h, 0.95)
    return {"requests": requests, "tokens": tokens, "outcomes": outcomes, "statuses": statuses,
            "success": sum(statuses.get(s, 0) for s in SUCCESS), "clients": int(clients or 0),
            "latency_avg_us": int(lat_sum) // int(lat_count) if lat_count else None,
            "latency_p95_us": None if p95 is None else round(p95)}


async def tiers(engine: AsyncEngine, flt: Filter, start: int, end: int, clients: list[str]) -> dict[str, list[str]]:
    """The tiers each of ``clients`` was counted under in the range (a key that changed tier has two)."""
    if not clients:
        return {}
    r = _rows(flt, slices(table_for(start, end), start, end, await marks(engine)))
    q = (select(r.c.client, r.c.tier).where(r.c.client.in_(clients))
         .group_by(r.c.client, r.c.tier).order_by(r.c.client, r.c.tier))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    out: dict[str, list[str]] = {c: [] for c in clients}
    for client, tier in rows:
        out[client].append(tier)
    return out
