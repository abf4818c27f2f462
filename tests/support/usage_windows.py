"""Usage windows as sidecars would write them (:mod:`sluice_core.usage`), with the totals they
carry, and the totals a collector's database holds, for exactness checks."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sluice_analytics.schema import HISTOGRAM, ROLLUPS
from sluice_core import keyschema, usage
from sluice_core.usage import OUTCOMES, UsageRow, UsageWindow
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

TotalKey = tuple[str, str, str]  # (namespace, client, outcome)


@dataclass
class Writer:
    """Windows from ``sources`` sidecar processes, each numbering its own (src, seq)."""

    namespace: str = "shop"
    sources: int = 4
    clients: int = 50
    seed: int = 1
    start_ms: int = 1_790_000_000_000
    totals: Counter[TotalKey] = field(default_factory=Counter)
    histogram: Counter[int] = field(default_factory=Counter)
    _seq: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def window(self, src: int, *, rows: int = 20, start_ms: int | None = None) -> UsageWindow:
        name = f"pod-{src}/run1"
        seq = self._seq.get(name, 0)
        self._seq[name] = seq + 1
        start = start_ms if start_ms is not None else self.start_ms + seq * 10_000
        w = UsageWindow(name, seq, self.namespace, start, start + 10_000)
        keys = set()
        while len(keys) < rows:
            keys.add((f"key:c{self.rng.randrange(self.clients)}", self.rng.choice(OUTCOMES[:3]),
                      f"/e{self.rng.randrange(3)}"))
        for client, outcome, endpoint in sorted(keys):
            n = self.rng.randrange(1, 500)
            hist = {self.rng.randrange(usage.HISTOGRAM_BUCKETS): n}
            w.rows.append(UsageRow(f"{self.namespace}/api", client, "free", endpoint, outcome,
                                   "none" if outcome == "limited" else "2xx", n, n, n * 900, n,
                                   self.rng.randrange(1, 10_000), hist, n * 100, n * 300))
        return w

    def count(self, w: UsageWindow) -> None:
        """What the stored totals must include once ``w`` is applied (once)."""
        for r in w.rows:
            self.totals[(w.namespace, r.client, r.outcome)] += r.requests
            for b, n in r.histogram.items():
                self.histogram[b] += n

    def windows(self, per_source: int, **kw: Any) -> list[UsageWindow]:
        made = [self.window(s, **kw) for _ in range(per_source) for s in range(self.sources)]
        for w in made:
            self.count(w)
        return made


async def xadd(redis: Any, windows: Iterable[UsageWindow], key: str = keyschema.USAGE_STREAM_KEY) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for w in windows:
            pipe.xadd(key, usage.encode(w), maxlen=1_000_000, approximate=True)
        await pipe.execute()


async def stored_totals(engine: AsyncEngine, table: str = "minute") -> Counter[TotalKey]:
    t = ROLLUPS[table]
    q = select(t.c.namespace, t.c.client, t.c.outcome, func.sum(t.c.requests)).group_by(
        t.c.namespace, t.c.client, t.c.outcome)
    async with engine.connect() as conn:
        return Counter({(ns, c, o): int(n) for ns, c, o, n in (await conn.execute(q)).all()})


async def stored_histogram(engine: AsyncEngine, table: str = "minute") -> Counter[int]:
    t = ROLLUPS[table]
    q = select(*(func.sum(t.c[h]) for h in HISTOGRAM))
    async with engine.connect() as conn:
        row = (await conn.execute(q)).one()
    return Counter({i: int(v) for i, v in enumerate(row) if v})


def xadd_sync(redis: Any, windows: Iterable[UsageWindow], key: str = keyschema.USAGE_STREAM_KEY) -> None:
    """:func:`xadd` with a blocking client (tests that run the collector as a process)."""
    pipe = redis.pipeline(transaction=False)
    for w in windows:
        pipe.xadd(key, usage.encode(w), maxlen=1_000_000, approximate=True)
    pipe.execute()


class StoredView:
    """The database of a collector process, read from a test that does not run an event loop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, read: Any) -> Any:
        import asyncio

        from sluice_analytics import database

        async def go() -> Any:
            engine = database.connect(self.url)
            try:
                return await read(engine)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def totals(self, table: str = "minute") -> Counter[TotalKey]:
        return self._run(lambda e: stored_totals(e, table))

    def applied(self) -> int:
        from sluice_analytics.schema import usage_applied

        async def count(engine: AsyncEngine) -> int:
            try:
                async with engine.connect() as conn:
                    return int((await conn.execute(select(func.count()).select_from(usage_applied))).scalar() or 0)
            except Exception:  # not migrated yet, or the database is down: nothing applied seen
                return -1

        return self._run(count)
