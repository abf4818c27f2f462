"""`make bench`: what the usage summary for ``status.usage`` costs the collector once a minute
(issue #10 §4): ``summary.compute`` (every policy's last hour, top clients ranked in SQL) on
SQLite with a busy last hour in the minute table, against a baseline measured in the same run:
one ``/v1/top?by=limited`` query (``queries.top``) of one namespace over the same hour, what a
dashboard asks. Then the summary's size in Redis (``MEMORY USAGE``). Written into
docs/benchmarks.md between the usage-summary markers.

Run alone: ``python -m bench.usage_summary [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sluice_analytics import database, migrate, queries, summary  # noqa: E402
from sluice_analytics.schema import KEY  # noqa: E402
from sluice_core import configstore, keyschema, usagesummary  # noqa: E402
from support.redis_servers import RedisServer  # noqa: E402

from bench.report import scaled_args, write_block  # noqa: E402

BEGIN, END = "<!-- bench-usage-summary:begin -->", "<!-- bench-usage-summary:end -->"
POLICIES, CLIENTS, NAMESPACES = 50, 100, 10  # x 60 minutes x 2 outcomes = 600,000 rows in the hour
RUNS = 5


def fill(path: Path, now: int, clients: int) -> int:
    cols = [*KEY, "requests", "tokens", "latency_sum_us", "latency_count", "latency_max_us", "bytes_in", "bytes_out"]
    rows = [(now - m * 60, f"ns{p % NAMESPACES}", f"ns{p % NAMESPACES}/p{p}", f"ip:10.0.{c // 250}.{c % 250}",
             "free", "/x", outcome, "2xx", 5, 5, 0, 0, 0, 0, 0)
            for m in range(60) for p in range(POLICIES) for c in range(clients) for outcome in ("allowed", "limited")]
    con = sqlite3.connect(path)
    con.executemany(f"INSERT INTO usage_minute ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", rows)
    con.commit()
    con.close()
    return len(rows)


async def measure(path: Path, redis_url: str, clients: int) -> tuple[int, list[float], list[float], int, int]:
    engine = database.connect(f"sqlite:///{path}")
    await migrate.upgrade(engine)
    now = int(time.time()) // 60 * 60
    rows = fill(path, now, clients)
    start = summary.since(now)
    flt = queries.Filter(namespace="ns0")
    ours, base = [], []
    out: dict[str, usagesummary.PolicySummary] = {}
    for _ in range(RUNS):
        t = time.perf_counter()
        await queries.top(engine, flt, start, now + 60, "limited", usagesummary.TOP)
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = await summary.compute(engine, now)
        ours.append(time.perf_counter() - t)
    await engine.dispose()
    async with configstore.connect(redis_url) as client:
        await usagesummary.write(client, out, at=now)
        size = int(await client.redis.memory_usage(keyschema.USAGE_SUMMARY_KEY) or 0)
    return rows, ours, base, len(out), size


def main() -> None:
    args = scaled_args(__doc__, ROOT / "docs" / "benchmarks.md", "the clients per policy", 50)
    clients = max(1, CLIENTS // args.scale)
    server = RedisServer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows, ours, base, policies, size = asyncio.run(measure(Path(tmp) / "usage.db", server.url, clients))
    finally:
        server.close()
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    block = "\n".join([
        BEGIN, "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, SQLite, median of {RUNS}: the minute table's "
        f"last hour holds {rows:,} rows ({POLICIES} policies in {NAMESPACES} namespaces x {clients} clients x 2 "
        "outcomes x 60 minutes). Command: `make bench` (`python -m bench.usage_summary`).", "",
        "| what | time | ratio |", "|---|---:|---:|",
        f"| baseline: `/v1/top?by=limited` of one namespace over the hour (`queries.top`) | {m_base * 1000:,.0f} ms | 1.00x |",
        f"| the summary of every policy (`summary.compute`, once a `--summary-interval-s`) | {m_ours * 1000:,.0f} ms "
        f"| {m_ours / m_base:.2f}x |", "",
        f"The summary of {policies} policies takes {size:,} bytes in Redis (`MEMORY USAGE`), "
        f"{size / max(policies, 1):,.0f} bytes a policy.", "", END])
    print(block)
    write_block(Path(args.out), BEGIN, END, block)


if __name__ == "__main__":
    main()
