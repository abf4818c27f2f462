"""`make bench`: the usage collector (issue #10 §6) into SQLite and into PostgreSQL, measured in
the same run. Written into docs/benchmarks.md between the bench-collector markers.

Per store: windows written to a real Redis stream (``XADD``, as sidecars do), then drained by
the collector's own loop (``Collector.step``: XREADGROUP, decode, one transaction per batch of
200, XACK) in this process: decisions represented per second (the requests the windows
count), windows and rows upserted per second. The baseline is the same windows applied one per
transaction (``--batch 1``), the way a collector without batching would. Then the stored bytes
per client-day: one client active every minute of a day on one endpoint and outcome, three
latency buckets used: 1,440 minute rows (kept 48 h), 24 hour rows (90 days) and one day row
(400 days), each row's size measured with its indexes (PostgreSQL ``pg_total_relation_size``,
SQLite the file's pages) over a table of a few thousand such rows.

Run alone: ``python -m bench.collector [--scale N] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sluice_analytics import database, migrate, store  # noqa: E402
from sluice_analytics.collector import Collector  # noqa: E402
from sluice_analytics.metrics import AnalyticsMetrics  # noqa: E402
from sluice_analytics.schema import ROLLUPS  # noqa: E402
from sluice_analytics.settings import AnalyticsSettings  # noqa: E402
from sluice_analytics.stream import UsageStream  # noqa: E402
from sluice_core import configstore, keyschema  # noqa: E402
from sluice_core.usage import UsageRow, UsageWindow  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from support.postgres import PostgresServer  # noqa: E402
from support.redis_servers import RedisServer  # noqa: E402
from support.usage_windows import Writer, xadd  # noqa: E402

from bench.report import scaled_args, write_block  # noqa: E402

BEGIN, END = "<!-- bench-collector:begin -->", "<!-- bench-collector:end -->"
WINDOWS = 3000  # per store
ROWS = 50  # per window (one sidecar's 10 s: 50 client x endpoint x outcome keys)
BASELINE_WINDOWS = 300
SIZE_CLIENTS, SIZE_MINUTES = 50, 120  # rows measured for the bytes per client-day


@dataclass
class Drain:
    windows: int
    requests: int
    rows: int
    seconds: float

    def per_s(self, n: int) -> float:
        return n / self.seconds


async def drain(redis_url: str, db_url: str, windows: list[UsageWindow], batch: int) -> Drain:
    """XADD ``windows``, then run the collector's loop until every one is applied."""
    engine = database.connect(db_url)
    await migrate.upgrade(engine)
    client = configstore.connect(redis_url)
    await client.redis.delete(keyschema.USAGE_STREAM_KEY)
    await xadd(client.redis, windows)
    settings = AnalyticsSettings(redis=redis_url, database=db_url, batch=batch, block_ms=100)
    collector = Collector(settings, engine, UsageStream(client, "bench", block_ms=100, claim_idle_s=60),
                          AnalyticsMetrics())
    await collector.stream.ensure_group()
    began = time.perf_counter()
    while collector.metrics.windows._value.get() < len(windows):
        await collector.step()
    seconds = time.perf_counter() - began
    m = collector.metrics
    result = Drain(int(m.windows._value.get()), int(m.requests._value.get()), int(m.rows._value.get()), seconds)
    await client.aclose()
    await engine.dispose()
    return result


def day_windows(start_s: int) -> list[UsageWindow]:
    """SIZE_CLIENTS clients, each one row a minute for SIZE_MINUTES minutes."""
    out = []
    for minute in range(SIZE_MINUTES):
        ts = (start_s + minute * 60) * 1000
        rows = [UsageRow("shop/api", f"key:customer-{c:05d}", "pro", "list-orders", "allowed", "2xx",
                         600, 600, 600 * 35_000, 600, 250_000, {10: 300, 11: 250, 14: 50}, 600 * 300,
                         600 * 2500) for c in range(SIZE_CLIENTS)]
        out.append(UsageWindow("size/run", minute, "shop", ts, ts + 60_000, rows))
    return out


async def row_bytes(db_url: str, path: Path | None) -> dict[str, float]:
    """Bytes per row of each rollup table (with its indexes), the rows having one shape."""
    engine = database.connect(db_url)
    await migrate.upgrade(engine)
    start = int(time.time()) // 86400 * 86400 - 86400
    await store.apply(engine, day_windows(start), now_s=start + 86400, keep_applied_s=10**9)
    async with engine.begin() as conn:
        t = ROLLUPS["minute"]
        n = int((await conn.execute(select(func.count()).select_from(t))).scalar() or 0)
        if engine.dialect.name == "postgresql":
            await conn.execute(text("ANALYZE"))
            size = int((await conn.execute(text("SELECT pg_total_relation_size('usage_minute')"))).scalar() or 0)
    await engine.dispose()
    if path is not None:  # SQLite: the file's pages in use (the minute table is nearly all of it)
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages, free, page = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
        size = (pages - free) * page
    # hour and day rows have the same columns and indexes as minute rows: the same size
    return {"row": size / n, "rows": n}


def table(results: dict[str, tuple[Drain, Drain, dict[str, float]]], elapsed: float, windows: int) -> str:
    lines = [BEGIN, "", "### The usage collector (issue #10)", "",
             f"_{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
             f"{elapsed:.0f} s. {windows:,} windows of {ROWS} rows from a real Redis stream, drained by "
             "the collector's loop; baseline: the same windows one per transaction (a batch merges rows of one "
             "key and minute, so it upserts fewer rows for the same windows)._", "",
             "| store | batch | windows/s | decisions represented/s | rows upserted/s | windows/s vs one per transaction |",
             "|---|---|---|---|---|---|"]
    for name, (batched, single, _size) in results.items():
        for label, d in (("200", batched), ("1 (baseline)", single)):
            ratio = batched.per_s(batched.windows) / single.per_s(single.windows)  # same work: windows
            lines.append(f"| {name} | {label} | {d.per_s(d.windows):,.0f} | {d.per_s(d.requests):,.0f} | "
                         f"{d.per_s(d.rows):,.0f} | {f'{ratio:.1f}×' if d is batched else '1×'} |")
    lines += ["", "| store | bytes per row (with indexes) | bytes per client-day (1,440 minute + 24 hour + 1 day rows) "
              "| held per always-active client (48 h of minutes, 90 d of hours, 400 d of days) |",
              "|---|---|---|---|"]
    for name, (_b, _s, size) in results.items():
        row = size["row"]
        lines.append(f"| {name} | {row:,.0f} | {row * 1465 / 1024:,.0f} KiB | "
                     f"{row * (2880 + 24 * 90 + 400) / 2**20:,.1f} MiB |")
    lines += ["", END]
    return "\n".join(lines)


async def run(scale: int) -> dict[str, tuple[Drain, Drain, dict[str, float]]]:
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-collector-"))
    redis, pg = RedisServer(), PostgresServer()
    results = {}
    try:
        start_ms = int(time.time() * 1000) - 3_600_000
        for name in ("SQLite", "PostgreSQL"):
            urls = [f"sqlite:///{tmp / f'{name}-{i}.db'}" if name == "SQLite" else pg.url(pg.create_database())
                    for i in range(3)]
            writer = Writer(sources=20, clients=2000, start_ms=start_ms)
            windows = writer.windows(WINDOWS // 20 // scale, rows=ROWS)
            print(f"{name}: batched ...", flush=True)
            batched = await drain(redis.url, urls[0], windows, 200)
            print(f"{name}: one per transaction ...", flush=True)
            single = await drain(redis.url, urls[1], windows[:BASELINE_WINDOWS // scale], 1)
            print(f"{name}: bytes per row ...", flush=True)
            path = tmp / f"{name}-2.db" if name == "SQLite" else None
            size = await row_bytes(urls[2], path)
            results[name] = (batched, single, size)
    finally:
        redis.close()
        pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> int:
    args = scaled_args(__doc__, ROOT / "docs" / "benchmarks.md", "the windows", 30)
    began = time.monotonic()
    results = asyncio.run(run(args.scale))
    block = table(results, time.monotonic() - began, WINDOWS // 20 // args.scale * 20)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


