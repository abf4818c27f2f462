"""The usage window entry: what a sidecar writes is what the collector reads, and anything else
is refused with the field named."""

from __future__ import annotations

import itertools
import json

import pytest
from sluice_core import usage
from sluice_core.usage import UsageFormatError, UsageRow, UsageWindow


def window(**kw: object) -> UsageWindow:
    row = UsageRow("shop/public-api", "key:shop/alice", "pro", "orders", "allowed", "2xx", requests=3, tokens=3,
                   latency_sum_us=3_600, latency_count=3, latency_max_us=2_000,
                   histogram={usage.latency_bucket(800): 2, usage.latency_bucket(2_000): 1}, bytes_in=30, bytes_out=900)
    w = UsageWindow("web-7f9c-1:ab12", 41, "shop", 1_700_000_000_000, 1_700_000_010_000, [row], 2, 0)
    for k, v in kw.items():
        setattr(w, k, v)
    return w


def test_a_window_survives_encoding() -> None:
    w = window()
    back = usage.decode({k.encode(): v.encode() for k, v in usage.encode(w).items()})
    assert back == w


def test_the_entry_is_compact_and_ascii() -> None:
    fields = usage.encode(window())
    assert fields["v"] == usage.ENCODING
    assert " " not in fields["w"] and fields["w"].isascii()


@pytest.mark.parametrize(("bend", "field"), [
    (lambda b: b.update(seq=-1), "w.seq"),
    (lambda b: b.update(seq=True), "w.seq"),
    (lambda b: b.update(src=""), "w.src"),
    (lambda b: b.update(ns="a\nb"), "w.ns"),
    (lambda b: b.update(end=0), "w.end"),
    (lambda b: b.update(rows={}), "w.rows"),
    (lambda b: b.update(folded=[1]), "w.folded"),
    (lambda b: b["rows"][0].__setitem__(4, "maybe"), "w.rows[0].outcome"),
    (lambda b: b["rows"][0].__setitem__(5, "6xx"), "w.rows[0].status"),
    (lambda b: b["rows"][0].__setitem__(6, 2**60), "w.rows[0].requests"),
    (lambda b: b["rows"][0].__setitem__(11, {"99": 1}), "w.rows[0].histogram"),
    (lambda b: b["rows"][0].__setitem__(11, {"1": "x"}), "w.rows[0].histogram[1].n"),
    (lambda b: b["rows"][0].pop(), "w.rows[0]"),
    (lambda b: b["rows"].append(list(b["rows"][0])), "w.rows[1]"),
])
def test_a_bad_entry_names_the_field(bend, field: str) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(usage.encode(window())["w"])
    bend(body)
    with pytest.raises(UsageFormatError) as err:
        usage.decode({"v": "1", "w": json.dumps(body)})
    assert str(err.value).startswith(field), str(err.value)


def test_an_unknown_encoding_or_no_json_is_refused() -> None:
    with pytest.raises(UsageFormatError, match=r"^v: encoding '2'"):
        usage.decode({"v": "2", "w": "{}"})
    with pytest.raises(UsageFormatError, match=r"^w: not JSON"):
        usage.decode({"v": "1", "w": "{"})
    with pytest.raises(UsageFormatError, match=r"^w\.rows: 50001 rows"):
        usage.decode({"v": "1", "w": json.dumps({"src": "s", "seq": 0, "ns": "", "start": 0, "end": 0,
                                                  "folded": [0, 0], "rows": [[]] * 50_001})})


def test_latency_buckets_cover_every_latency() -> None:
    assert usage.latency_bucket(0) == 0
    assert usage.latency_bucket(usage.LATENCY_BOUNDS_US[0]) == 0
    assert usage.latency_bucket(usage.LATENCY_BOUNDS_US[0] + 1) == 1
    assert usage.latency_bucket(10**12) == usage.HISTOGRAM_BUCKETS - 1
    bounds = usage.LATENCY_BOUNDS_US
    assert all(b > a for a, b in itertools.pairwise(bounds))
    assert bounds[-1] > 30_000_000  # 30 s: a request that slow is still in a bounded bucket


def test_a_quantile_is_within_a_bucket_of_the_truth() -> None:
    latencies = [1_000 * i for i in range(1, 1001)]  # 1 ms .. 1 s, evenly
    hist: dict[int, int] = {}
    for lat in latencies:
        b = usage.latency_bucket(lat)
        hist[b] = hist.get(b, 0) + 1
    for q, truth in ((0.5, 500_000), (0.95, 950_000), (0.99, 990_000)):
        got = usage.quantile_us(hist, q)
        assert got is not None and truth / 2**0.5 <= got <= truth * 2**0.5
    assert usage.quantile_us({}, 0.5) is None
