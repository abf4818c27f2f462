"""The SQL tables of usage analytics (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Three rollups with one shape: ``usage_minute`` (kept 48 h), ``usage_hour`` (90 days) and
``usage_day`` (400 days). ``ts`` is the period's start in unix seconds (an integer works alike
in both databases and in ``ts - ts % 3600``); a window counts in the minute its ``start`` falls
in. The key is (ts, namespace, policy, client, tier, endpoint, outcome, status); counters are
sums, ``latency_max_us`` a maximum.

The latency histogram is 36 nullable BIGINT columns ``h00`` … ``h35`` (bucket ``i`` of
:data:`sluice_core.usage.LATENCY_BOUNDS_US`), a zero bucket stored as NULL. Why not one blob or
array: an upsert adds two histograms in SQL (``COALESCE(a + b, a, b)`` per column) and a rollup
sums them (``SUM`` skips NULLs), with the same statement on both databases and no read-modify-
write; and a NULL costs nothing in either (SQLite's record header says "NULL" in one byte with
no payload; PostgreSQL sets a bit in the row's null bitmap), so a row with its latencies in
three buckets stores three numbers, about what a sparse encoding would.

``usage_applied`` records every window applied, by ``(src, seq)``, in the transaction that
applied it: the exactly-once record. ``usage_rollups`` says up to where each coarser table was
rolled up.
"""

from __future__ import annotations

from sluice_core.usage import HISTOGRAM_BUCKETS, MAX_TEXT
from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table

metadata = MetaData()

KEY = ("ts", "namespace", "policy", "client", "tier", "endpoint", "outcome", "status")
SUMS = ("requests", "tokens", "latency_sum_us", "latency_count", "bytes_in", "bytes_out")
MAXES = ("latency_max_us",)
HISTOGRAM = tuple(f"h{i:02d}" for i in range(HISTOGRAM_BUCKETS))
COUNTERS = (*SUMS, *MAXES, *HISTOGRAM)

PERIODS = {"minute": 60, "hour": 3600, "day": 86400}
"""Each rollup table's period in seconds."""


def _rollup(name: str) -> Table:
    text = [Column(k, String(MAX_TEXT), primary_key=True) for k in KEY[1:]]
    return Table(
        f"usage_{name}", metadata,
        Column("ts", BigInteger, primary_key=True, autoincrement=False), *text,
        *(Column(c, BigInteger, nullable=False) for c in (*SUMS, *MAXES)),
        *(Column(c, BigInteger, nullable=True) for c in HISTOGRAM),
    )


usage_minute = _rollup("minute")
usage_hour = _rollup("hour")
usage_day = _rollup("day")
ROLLUPS = {"minute": usage_minute, "hour": usage_hour, "day": usage_day}

usage_applied = Table(
    "usage_applied", metadata,
    Column("src", String(MAX_TEXT), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("end_s", BigInteger, nullable=False),  # the window's end: pruned by it
    Index("ix_usage_applied_end_s", "end_s"),
)

usage_rollups = Table(
    "usage_rollups", metadata,
    Column("target", String(16), primary_key=True),  # "hour" | "day"
    Column("done_until", BigInteger, nullable=False),  # every period starting before it is rolled up
    Column("runs", Integer, nullable=False, default=0),
)

# The queries of the API (issue #10 §3): the key's leading ``ts`` serves "everything in a range"
# (top consumers, the report over all clients); these serve one namespace / client / endpoint's
# series, and "who is limited now" (revision 0002).
for _name, _t in ROLLUPS.items():
    Index(f"ix_usage_{_name}_ns_ts", _t.c.namespace, _t.c.ts)
    Index(f"ix_usage_{_name}_client_ts", _t.c.client, _t.c.ts)
    Index(f"ix_usage_{_name}_endpoint_ts", _t.c.namespace, _t.c.endpoint, _t.c.ts)
Index("ix_usage_minute_outcome_ts", usage_minute.c.outcome, usage_minute.c.ts)

usage_alerts = Table(
    "usage_alerts", metadata,
    # One row per near-limit alert sent: (policy, alert, client, period) is the deduplication,
    # so two collector replicas detecting the same crossing send it once (the insert that wins).
    Column("policy", String(MAX_TEXT), primary_key=True),
    Column("alert", String(63), primary_key=True),
    Column("client", String(MAX_TEXT), primary_key=True),
    Column("period_start", BigInteger, primary_key=True, autoincrement=False),
    Column("tier", String(MAX_TEXT), nullable=False),
    Column("used", BigInteger, nullable=False),
    Column("allowance", BigInteger, nullable=False),
    Column("sent_at", BigInteger, nullable=False),
    Index("ix_usage_alerts_period_start", "period_start"),
)
