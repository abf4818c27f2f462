"""Usage windows: what a sidecar counted in one flush window, as it travels to the collector.

The contract between the two sides of usage analytics. A sidecar aggregates its decisions in
memory and, at the end of each window (10 s by default), appends ONE entry to the Redis stream
:data:`~sluice_core.keyschema.USAGE_STREAM_KEY` (``XADD ... MAXLEN ~``); ``sluice analytics``
reads the stream with a consumer group and upserts rollups. Nothing here touches Redis: this
module only encodes and decodes (and checks) an entry.

An entry has two fields::

    v = "1"                      (the encoding; a collector refuses one it does not know)
    w = <JSON of the window>     (compact, keys below)

The window (JSON object):

| key | type | meaning |
|---|---|---|
| ``src`` | string | the writing sidecar process, unique per process start (pod name + start id) |
| ``seq`` | int ≥ 0 | the window's number within ``src``, rising by one per window |
| ``ns`` | string | the sidecar's namespace |
| ``start``, ``end`` | int (unix ms) | the window; ``start`` < = ``end`` |
| ``rows`` | list of rows | see :data:`ROW_FIELDS` |
| ``folded`` | ``[clients, endpoints]`` | requests whose client / endpoint went to :data:`OTHER` |

``(src, seq)`` identifies a window: a sidecar that retries an XADD whose reply it lost may
append the same window twice, and a collector that crashed between its commit and its XACK
reads it again; the collector records the pairs it applied in the same transaction as the
counts, so a window counts once whatever happens around it.

A row is a JSON array in the order of :data:`ROW_FIELDS`; its first six fields are the key
(at most one row per key in a window), the rest are counters. The client is never a secret:
``key:<key id>`` (the grant's or keys file's id), ``header:<short digest>``, ``ip:<address
or prefix>``, ``anonymous``, or :data:`OTHER`. The endpoint is a rule's name, or for requests
no rule matches a normalised path (``/users/:id``, at most two segments), or :data:`OTHER`.
Latency is the upstream's, in microseconds; the histogram is sparse: ``{"<bucket>": count}``
over :data:`LATENCY_BOUNDS_US` (bucket ``i`` counts latencies ≤ bound ``i`` and > bound
``i-1``; the last bucket, ``len(LATENCY_BOUNDS_US)``, counts the rest).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENCODING = "1"
OTHER = "(other)"
"""Where clients and endpoints beyond a window's bounds are counted (and how many requests
that folded is in :attr:`UsageWindow.folded_clients` / ``folded_endpoints``)."""

OUTCOMES = ("allowed", "limited", "shadow_limited", "failed_open", "failed_closed",
            "unauthorized", "skipped")
"""What the sidecar decided: forwarded under the limit; refused (429); over the limit but
forwarded because the policy is in shadow mode; forwarded / refused because the store failed
(the policy's failure mode); refused for a missing or unknown API key (401); covered by no
policy (forwarded, not counted against anything)."""

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")
"""The upstream's answer; ``none`` when the request never reached it (refused, or the upstream
could not be reached)."""

ROW_FIELDS = ("policy", "client", "tier", "endpoint", "outcome", "status",
              "requests", "tokens", "latency_sum_us", "latency_count", "latency_max_us",
              "histogram", "bytes_in", "bytes_out")
KEY_FIELDS = ROW_FIELDS[:6]

LATENCY_BOUNDS_US: tuple[int, ...] = tuple(round(250 * 2 ** (i / 2)) for i in range(35))
"""Upper bounds of the latency histogram's buckets: from 250 µs, each √2 times the one before,
up to about 33 s (35 bounds, 36 buckets). A quantile read from it is within √2 of the true one
(±19 % around the bucket's geometric middle): enough for p50 / p95 / p99 on a dashboard."""
HISTOGRAM_BUCKETS = len(LATENCY_BOUNDS_US) + 1

MAX_ROWS = 50_000
"""The most rows one entry may carry (a sidecar's aggregator folds before it gets there); a
collector refuses bigger entries rather than trusting whoever could write to the stream."""
MAX_TEXT = 256  # longest policy / client / tier / endpoint / src / ns
MAX_COUNT = 2**53 - 1  # exact in JSON readers that use doubles

_TEXT = re.compile(rf"[\x20-\x7e]{{0,{MAX_TEXT}}}")  # printable ASCII: safe in a SQL text column and a CSV


class UsageFormatError(ValueError):
    """An entry that is not a usage window of a known encoding; the message names the field."""


def latency_bucket(latency_us: int) -> int:
    """The histogram bucket of one latency (binary search over :data:`LATENCY_BOUNDS_US`)."""
    lo, hi = 0, len(LATENCY_BOUNDS_US)
    while lo < hi:
        mid = (lo + hi) // 2
        if latency_us <= LATENCY_BOUNDS_US[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def quantile_us(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0 < q ≤ 1) of a histogram, at the geometric middle of its bucket
    (None for an empty histogram). The last bucket has no upper bound: its lower bound."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank, seen = math.ceil(q * total), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            if bucket >= len(LATENCY_BOUNDS_US):
                return float(LATENCY_BOUNDS_US[-1])
            upper = LATENCY_BOUNDS_US[bucket]
            lower = LATENCY_BOUNDS_US[bucket - 1] if bucket else upper / math.sqrt(2)
            return math.sqrt(lower * upper)
    return float(LATENCY_BOUNDS_US[-1])


@dataclass(slots=True)
class UsageRow:
    """The counts of one key (policy, client, tier, endpoint, outcome, status) in one window.
    ``policy`` is the policy's ref (``namespace/name``, a cluster policy's name; empty for
    ``skipped``), ``tier`` empty where none applies."""

    policy: str
    client: str
    tier: str
    endpoint: str
    outcome: str
    status: str
    requests: int = 0
    tokens: int = 0
    latency_sum_us: int = 0
    latency_count: int = 0
    latency_max_us: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.policy, self.client, self.tier, self.endpoint, self.outcome, self.status)


@dataclass(slots=True)
class UsageWindow:
    source: str
    seq: int
    namespace: str
    start_ms: int
    end_ms: int
    rows: list[UsageRow] = field(default_factory=list)
    folded_clients: int = 0
    folded_endpoints: int = 0


def encode(window: UsageWindow) -> dict[str, str]:
    """The stream entry's fields (for ``XADD``)."""
    rows = [[r.policy, r.client, r.tier, r.endpoint, r.outcome, r.status, r.requests, r.tokens,
             r.latency_sum_us, r.latency_count, r.latency_max_us,
             {str(b): n for b, n in sorted(r.histogram.items()) if n}, r.bytes_in, r.bytes_out]
            for r in window.rows]
    body = {"src": window.source, "seq": window.seq, "ns": window.namespace, "start": window.start_ms,
            "end": window.end_ms, "rows": rows, "folded": [window.folded_clients, window.folded_endpoints]}
    return {"v": ENCODING, "w": json.dumps(body, separators=(",", ":"), ensure_ascii=True)}


def decode(fields: Mapping[bytes | str, bytes | str]) -> UsageWindow:
    """A stream entry's fields back into a window, every field checked (UsageFormatError)."""
    text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    version = text.get("v")
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    if version != ENCODING:
        raise UsageFormatError(f"v: encoding {version!r} is not known (this collector reads {ENCODING!r})")
    raw = text.get("w")
    try:
        body = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageFormatError(f"w: not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UsageFormatError("w: must be a JSON object")
    start, end = _count(body, "start"), _count(body, "end")
    if end < start:
        raise UsageFormatError("w.end: before w.start")
    rows = body.get("rows")
    if not isinstance(rows, list):
        raise UsageFormatError("w.rows: must be a list")
    if len(rows) > MAX_ROWS:
        raise UsageFormatError(f"w.rows: {len(rows)} rows, at most {MAX_ROWS}")
    folded = body.get("folded")
    if not (isinstance(folded, list) and len(folded) == 2):
        raise UsageFormatError("w.folded: must be [clients, endpoints]")
    fold = {"clients": folded[0], "endpoints": folded[1]}
    window = UsageWindow(_text(body, "src", empty=False), _count(body, "seq"), _text(body, "ns"), start, end,
                         [], _count(fold, "clients", "w.folded"), _count(fold, "endpoints", "w.folded"))
    seen: set[tuple[str, ...]] = set()
    for i, row in enumerate(rows):
        decoded = _row(row, f"w.rows[{i}]")
        if decoded.key in seen:
            raise UsageFormatError(f"w.rows[{i}]: a second row for the same key")
        seen.add(decoded.key)
        window.rows.append(decoded)
    return window


def _row(row: Any, where: str) -> UsageRow:
    if not (isinstance(row, list) and len(row) == len(ROW_FIELDS)):
        raise UsageFormatError(f"{where}: must be a list of {len(ROW_FIELDS)} fields ({', '.join(ROW_FIELDS)})")
    named = dict(zip(ROW_FIELDS, row, strict=True))
    texts = [_text(named, name, where) for name in KEY_FIELDS]
    if texts[4] not in OUTCOMES:
        raise UsageFormatError(f"{where}.outcome: {texts[4]!r} is not one of {', '.join(OUTCOMES)}")
    if texts[5] not in STATUS_CLASSES:
        raise UsageFormatError(f"{where}.status: {texts[5]!r} is not one of {', '.join(STATUS_CLASSES)}")
    hist = named["histogram"]
    if not isinstance(hist, dict):
        raise UsageFormatError(f"{where}.histogram: must be an object of bucket -> count")
    histogram: dict[int, int] = {}
    for bucket, n in hist.items():
        if not (isinstance(bucket, str) and bucket.isdigit() and int(bucket) < HISTOGRAM_BUCKETS):
            raise UsageFormatError(f"{where}.histogram: bucket {bucket!r} is not 0..{HISTOGRAM_BUCKETS - 1}")
        histogram[int(bucket)] = _count({"n": n}, "n", f"{where}.histogram[{bucket}]")
    n = {name: _count(named, name, where) for name in ROW_FIELDS[6:] if name != "histogram"}
    return UsageRow(texts[0], texts[1], texts[2], texts[3], texts[4], texts[5], n["requests"], n["tokens"],
                    n["latency_sum_us"], n["latency_count"], n["latency_max_us"], histogram,
                    n["bytes_in"], n["bytes_out"])


def _text(obj: Mapping[str, Any], name: str, where: str = "w", *, empty: bool = True) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not _TEXT.fullmatch(value) or (not empty and not value):
        raise UsageFormatError(f"{where}.{name}: must be printable ASCII text of at most {MAX_TEXT} characters"
                               + ("" if empty else ", not empty"))
    return value


def _count(obj: Mapping[str, Any], name: str, where: str = "w") -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise UsageFormatError(f"{where}.{name}: must be an integer from 0 to 2^53-1")
    return value
