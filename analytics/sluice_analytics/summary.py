"""Each policy's last hour, computed from the minute rollups for the operator's ``status.usage``
(:mod:`sluice_core.usagesummary` says where it goes and who reads it).

Two grouped queries over the minute table's last hour, whatever the number of policies and
clients: the totals per policy, and each policy's most limited clients ranked in SQL
(``ROW_NUMBER() OVER (PARTITION BY policy …)``, on SQLite and PostgreSQL alike), so only
:data:`~sluice_core.usagesummary.TOP` rows a policy come back, however many clients a flood made.
Rows without a policy (requests no policy covered) and the fold of clients beyond a sidecar's
bound (:data:`~sluice_core.usage.OTHER`: not a client) are not ranked.
"""

from __future__ import annotations

from sluice_core.usage import OTHER
from sluice_core.usagesummary import MAX_POLICIES, TOP, WINDOW_S, PolicySummary
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics.schema import usage_minute

LIMITED = "limited"


def since(now_s: float) -> int:
    """The first minute of the window: the last hour's minutes, the current one included."""
    minute = int(now_s) // 60 * 60
    return minute - WINDOW_S + 60


async def compute(engine: AsyncEngine, now_s: float) -> dict[str, PolicySummary]:
    t = usage_minute
    start = since(now_s)
    requests = func.sum(t.c.requests)
    limited = func.sum(case((t.c.outcome == LIMITED, t.c.requests), else_=0))
    totals = (select(t.c.policy, requests, limited)
              .where(t.c.ts >= start, t.c.policy != "")
              .group_by(t.c.policy).order_by(requests.desc(), t.c.policy)
              .limit(MAX_POLICIES + 1))  # one more: the summary then says it is truncated
    per_client = (select(t.c.policy, t.c.client, func.sum(t.c.requests).label("n"))
                  .where(t.c.ts >= start, t.c.outcome == LIMITED, t.c.policy != "", t.c.client != OTHER)
                  .group_by(t.c.policy, t.c.client).subquery("c"))
    rank = func.row_number().over(partition_by=per_client.c.policy,
                                  order_by=(per_client.c.n.desc(), per_client.c.client)).label("rank")
    ranked = select(per_client.c.policy, per_client.c.client, per_client.c.n, rank).subquery("r")
    tops = (select(ranked.c.policy, ranked.c.client, ranked.c.n).where(ranked.c.rank <= TOP)
            .order_by(ranked.c.policy, ranked.c.rank))
    async with engine.connect() as conn:
        rows = (await conn.execute(totals)).all()
        top_rows = (await conn.execute(tops)).all()
    clients: dict[str, list[tuple[str, int]]] = {}
    for policy, client, n in top_rows:
        clients.setdefault(policy, []).append((client, int(n)))
    return {policy: PolicySummary(int(n), int(lim), tuple(clients.get(policy, ())))
            for policy, n, lim in rows}
