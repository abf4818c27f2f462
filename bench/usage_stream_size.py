"""`make bench`: what the usage stream costs in Redis (issue #10), for sizing
``--usage-stream-maxlen`` and Redis: windows made by the sidecar's own aggregator, XADDed to a
real Redis, ``MEMORY USAGE`` of the stream over the entries it holds.

Each window: ``clients`` API-key clients, each with 10 requests on one rule (allowed, 2xx,
latencies spread over a few histogram buckets), one in ten also with limited requests; and a
window at the aggregator's row bound (many clients × endpoints). Written into
docs/benchmarks.md between the usage-stream markers.

Run alone: ``python -m bench.usage_stream_size [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sluice_core import scripts, usage  # noqa: E402
from sluice_core.keyschema import USAGE_GROUP, USAGE_STREAM_KEY  # noqa: E402
from sluice_core.sidecar_settings import SidecarSettings  # noqa: E402
from sluice_sidecar.usage_aggregate import UsageAggregator  # noqa: E402
from sluice_sidecar.usage_note import UsageNote  # noqa: E402
from support.redis_servers import RedisServer  # noqa: E402

from bench.report import write_block  # noqa: E402

BEGIN, END = "<!-- bench-usage-stream:begin -->", "<!-- bench-usage-stream:end -->"
ENTRIES = 50  # per case: MEMORY USAGE over this many, so the stream's fixed part is spread
TRIM_ENTRIES = 1000  # windows applied by a collector, for the trim's before/after


def _window(clients: int, endpoints: int, seq: int, rng: random.Random) -> usage.UsageWindow:
    agg = UsageAggregator(max_clients=1000, max_endpoints=100)
    for c in range(clients):
        for e in range(endpoints):
            outcomes = ["allowed"] * 10 + (["limited"] * 3 if c % 10 == 0 else [])
            for outcome in outcomes:
                note = UsageNote()
                note.append(("shop/api", False, f"k{c:06d}", f"customer-{c:06d}", "free",
                                       f"rule-{e:02d}", outcome, 1 if outcome == "allowed" else 0))
                if outcome == "allowed":
                    note.status, note.latency_us = 200, int(rng.lognormvariate(9, 1))
                    note.bytes_in, note.bytes_out = 120, rng.randrange(200, 20_000)
                agg.record(note, "/items/1")
    return agg.take("shop-api-6d5f8-x7k2q/1a2b3c", seq, "shop")


def measure(server: RedisServer, clients: int, endpoints: int) -> tuple[int, int, float]:
    """Rows per window, JSON bytes per window, Redis bytes per entry."""
    r = server.client()
    r.delete(USAGE_STREAM_KEY)
    rng = random.Random(clients * 1000 + endpoints)
    w = _window(clients, endpoints, 0, rng)  # one window's rows; each entry its own seq
    fields: dict[str, str] = {}
    for seq in range(ENTRIES):
        w.seq = seq
        fields = usage.encode(w)
        r.xadd(USAGE_STREAM_KEY, fields)  # type: ignore[arg-type]
    rows, json_bytes = len(w.rows), len(fields["w"])
    total = int(r.memory_usage(USAGE_STREAM_KEY, samples=0) or 0)
    return rows, json_bytes, total / ENTRIES


def acked_then_trimmed(server: RedisServer, clients: int) -> tuple[int, int, int, int]:
    """A collector's view: ``default`` windows read and acknowledged by the group. XLEN and
    bytes after XACK alone (the collector before the trim), then after ``trim_usage.lua``."""
    r = server.client()
    r.delete(USAGE_STREAM_KEY)
    w = _window(clients, 1, 0, random.Random(clients))
    for seq in range(TRIM_ENTRIES):
        w.seq = seq
        r.xadd(USAGE_STREAM_KEY, usage.encode(w))  # type: ignore[arg-type]
    r.xgroup_create(USAGE_STREAM_KEY, USAGE_GROUP, id="0")
    while got := r.xreadgroup(USAGE_GROUP, "bench", {USAGE_STREAM_KEY: ">"}, count=100):
        r.xack(USAGE_STREAM_KEY, USAGE_GROUP, *[i for i, _ in got[0][1]])
    acked = (int(r.xlen(USAGE_STREAM_KEY)), int(r.memory_usage(USAGE_STREAM_KEY, samples=0) or 0))
    r.eval(scripts.trim_usage().source, 1, USAGE_STREAM_KEY)
    return (*acked, int(r.xlen(USAGE_STREAM_KEY)), int(r.memory_usage(USAGE_STREAM_KEY, samples=0) or 0))


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.1f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    default = int(next(f.default for f in dataclasses.fields(SidecarSettings) if f.name == "usage_stream_maxlen"))
    cases = [(1, 1), (10, 1), (100, 1), (1000, 1), (1000, 25)]
    server = RedisServer()
    try:
        results = [(c, e, *measure(server, c, e)) for c, e in cases]
        trim = acked_then_trimmed(server, 100)
    finally:
        server.close()
    lines = [BEGIN, "", f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: windows from the sidecar's "
             f"aggregator, {ENTRIES} XADDed per case to a real Redis, `MEMORY USAGE` of the stream / "
             f"{ENTRIES}. Command: `make bench` (`python -m bench.usage_stream_size`).", "",
             f"| window | rows | JSON | Redis per entry | at the default `--usage-stream-maxlen` ({default:,}) "
             "| at 100,000 entries |",
             "|---|---:|---:|---:|---:|---:|"]
    for clients, endpoints, rows, json_bytes, per_entry in results:
        lines.append(f"| {clients:,} client(s) × {endpoints} endpoint(s) | {rows:,} | {json_bytes / 1000:,.1f} KB | "
                     f"{per_entry / 1000:,.1f} KB | {_mb(per_entry * default)} | {_mb(per_entry * 100_000)} |")
    lines += ["", f"A collector applied {TRIM_ENTRIES:,} windows of 100 clients (read and acknowledged "
              f"by its group): after `XACK` alone the stream still held {trim[0]:,} entries, "
              f"{_mb(trim[1])}; after `trim_usage.lua` (what `sluice analytics` runs after each batch) "
              f"{trim[2]:,} entries, {trim[3]:,} bytes.", "", END]
    block = "\n".join(lines)
    print(block)
    write_block(Path(args.out), BEGIN, END, block)


if __name__ == "__main__":
    main()
