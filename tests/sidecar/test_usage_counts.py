"""The sidecar's usage aggregation (``sluice_sidecar.usage_aggregate``): endpoints from paths,
client names, and the bounds (clients, endpoints, rows) whatever the traffic; the admin port's
``/usage`` of an in-process sidecar with the in-memory store (no Redis: usage stays there)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
from hypothesis import given
from hypothesis import strategies as st
from sluice_core import usage
from sluice_core.manifest import to_manifest
from sluice_core.parse import parse_policy
from sluice_sidecar.usage_aggregate import MAX_SEGMENT, UsageAggregator, endpoint_of, status_class
from sluice_sidecar.usage_note import UsageNote
from support.http_calls import call
from support.sidecar_harness import Factory, policy_doc

OTHER = usage.OTHER


def test_endpoints_keep_two_segments_with_ids_replaced() -> None:
    cases = {
        "/": "/", "/users": "/users", "/users/": "/users/", "/users/42/orders": "/users/:id",
        "/users/550e8400-e29b-41d4-a716-446655440000/x": "/users/:id",
        "/blobs/0123456789abcdefABCDEF": "/blobs/:id", "/v1/cafe": "/v1/cafe", "/v1/beef1234": "/v1/beef1234",
        "/a/b/c/d": "/a/b", "/%E2%82%AC/x": "/%E2%82%AC/x", "/x/" + "a" * (MAX_SEGMENT + 1): "/x/:id",
        "/x/caf\udce9": "/x/:id", "/x/tab\there": "/x/:id", "/12/34": "/:id/:id",
        "/x/550e8400-e29b-41d4-a716-44665544000g": "/x/550e8400-e29b-41d4-a716-44665544000g",
    }
    assert {p: endpoint_of(p) for p in cases} == cases


def test_hostile_paths_give_short_endpoints() -> None:
    for path in ("/" + "a" * 1_000_000, "/" * 1_000_000, "/x/" + "1-" * 500_000, "/" + "0" * 999_999 + "x"):
        assert len(endpoint_of(path)) <= 2 * MAX_SEGMENT + 2


@given(st.text(max_size=300).map(lambda s: "/" + s))
def test_every_endpoint_is_a_valid_usage_name(path: str) -> None:
    e = endpoint_of(path)
    assert e.startswith("/") and e.count("/") <= 2 and len(e) <= usage.MAX_TEXT
    assert e.isascii() and e.isprintable()


def test_status_classes() -> None:
    assert [status_class(s) for s in (0, 101, 200, 204, 301, 404, 429, 503, 999)] == \
        ["none", "2xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "none"]


def test_client_names_never_carry_a_key_and_truncate_addresses_when_asked() -> None:
    a = UsageAggregator(max_clients=10, max_endpoints=10)
    assert a.client_of("kAbCdEfGhIjKlMnOp", "acme-prod", False) == "key:acme-prod"
    assert a.client_of("kAbCdEfGhIjKlMnOp", "x" * 300, False) == "key:" + "x" * (usage.MAX_TEXT - 4)
    assert a.client_of("hAbCdEfGhIjKlMnOp", "", True) == "header:AbCdEfGhIjKlMnOp"
    assert a.client_of("i10.1.2.3", "", False) == "ip:10.1.2.3"
    assert a.client_of("i10.1.2.3", "", True) == "ip:10.1.2.0/24"
    assert a.client_of("i2001:db8:1:2::/64", "", False) == "ip:2001:db8:1:2::/64"
    assert a.client_of("i2001:db8:1:2::/64", "", True) == "ip:2001:db8:1::/48"
    assert a.client_of("i2001:db8:1:2::5", "", True) == "ip:2001:db8:1::/48"  # prefix length 128


def _note(client: str, *, tier: str = "free", outcome: str = "allowed", status: int = 200,
          latency_us: int = 1000) -> UsageNote:
    note = UsageNote()
    note.append(("ns/p", False, client, "", tier, "", outcome, 1))
    note.status, note.latency_us, note.bytes_in, note.bytes_out = status, latency_us, 10, 20
    return note


def test_fifty_thousand_clients_in_one_window_stay_within_the_bounds() -> None:
    a = UsageAggregator(max_clients=1_000, max_endpoints=100)
    n = 50_000
    for i in range(n):
        a.record(_note(f"i10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"), f"/r{i % 150}/x")
    w = a.take("src", 0, "ns")
    assert sum(r.requests for r in w.rows) == n  # nothing lost: folded, not dropped
    assert w.folded_clients == n - 1_000
    assert w.folded_endpoints == sum(1 for i in range(n) if i % 150 >= 100)
    assert len({r.client for r in w.rows} - {OTHER}) == 1_000
    assert len({r.endpoint for r in w.rows} - {OTHER}) == 100
    assert len(w.rows) <= usage.MAX_ROWS and a.dropped == 0
    back = usage.decode(usage.encode(w))  # the collector takes it as it is
    assert back == w
    assert not len(a) and a.take("src", 1, "ns").rows == []  # the next window starts empty


def test_rows_fold_past_half_their_bound_and_stop_at_it() -> None:
    a = UsageAggregator(max_clients=100_000, max_endpoints=100_000, max_rows=100)
    for i in range(1_000):  # a new client and a new endpoint each: a new key each
        a.record(_note(f"i10.0.{i >> 8}.{i & 255}"), f"/e{i}")
    w = a.take("src", 0, "ns")
    assert len(w.rows) == 51  # 50 named, then everything in one (other) row
    assert w.folded_clients == w.folded_endpoints == 950
    assert sum(r.requests for r in w.rows) == 1_000
    for i in range(1_000):  # keys that stay new even folded (a tier each): dropped past 100 rows
        a.record(_note("i10.0.0.1", tier=f"t{i}"), "/e")
    w = a.take("src", 1, "ns")
    assert len(w.rows) == 100 and a.dropped == 1_000 - 100
    assert sum(r.requests for r in w.rows) == 100


def test_latency_is_counted_only_for_answers_of_the_upstream() -> None:
    a = UsageAggregator(max_clients=10, max_endpoints=10)
    for lat in (100, 5_000, 2_000_000):
        a.record(_note("i10.0.0.1", latency_us=lat), "/x")
    a.record(_note("i10.0.0.1", outcome="limited", status=0), "/x")
    rows = {r.outcome: r for r in a.take("s", 0, "ns").rows}
    ok, refused = rows["allowed"], rows["limited"]
    assert (ok.latency_count, ok.latency_sum_us, ok.latency_max_us) == (3, 2_005_100, 2_000_000)
    assert ok.histogram == {usage.latency_bucket(100): 1, usage.latency_bucket(5_000): 1,
                            usage.latency_bucket(2_000_000): 1}
    assert (refused.status, refused.latency_count, refused.histogram) == ("none", 0, {})


def test_truncate_ips_is_a_policy_option() -> None:
    doc = policy_doc()
    doc["spec"]["usage"] = {"truncateIPs": True}
    p = parse_policy(doc)
    assert p.usage.truncate_ips and parse_policy(to_manifest(p)) == p
    assert "usage" not in to_manifest(parse_policy(policy_doc()))["spec"]  # not written when unset


async def test_usage_of_the_memory_store_is_at_the_admin_port(sidecars: Factory,
                                                              http: aiohttp.ClientSession) -> None:
    doc = policy_doc()
    doc["spec"]["usage"] = {"truncateIPs": True}
    sc = await sidecars(doc, keys={"sk-secret-key-1": {"tier": "free", "id": "team-a"}},
                        usage_window_s=3600.0)
    assert (await call(http, "GET", sc.url + "/a/1")).status == 200
    assert (await call(http, "GET", sc.url + "/a/2", headers={"X-API-Key": "sk-secret-key-1"})).status == 200
    r = await call(http, "GET", sc.admin_url + "/usage")
    assert r.status == 200
    body = json.loads(r.body)
    assert body["stream"] is False and body["last"] is None
    rows = {(row[1], row[3], row[4], row[5]): row[6] for row in body["current"]["rows"]}
    assert rows == {("ip:127.0.0.0/24", "/a/:id", "allowed", "2xx"): 1,
                    ("key:team-a", "/a/:id", "allowed", "2xx"): 1}
    assert body["current"]["fields"] == list(usage.ROW_FIELDS)
    assert b"sk-secret-key-1" not in r.body


@given(st.integers(min_value=0, max_value=10**12))
def test_the_aggregators_bucket_is_the_contracts(latency_us: int) -> None:
    a = UsageAggregator(max_clients=1, max_endpoints=1)
    a.record(_note("i10.0.0.1", latency_us=latency_us), "/x")
    assert a.take("s", 0, "ns").rows[0].histogram == {usage.latency_bucket(latency_us): 1}


async def test_bytes_are_counted_for_streamed_bodies_both_ways(sidecars: Factory, http: aiohttp.ClientSession) -> None:
    sc = await sidecars(policy_doc(), usage_window_s=3600.0)
    async with http.get(sc.url + "/__stream/200000") as r:  # relayed in 64 KiB chunks
        assert r.status == 200 and len(await r.read()) == 200_000

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 10_000

    async with http.post(sc.url + "/echo", data=chunks()) as r:  # chunked: no Content-Length
        assert r.status == 200
        echoed = await r.read()
    body = json.loads((await call(http, "GET", sc.admin_url + "/usage")).body)
    fields = body["current"]["fields"]
    rows = {row[fields.index("endpoint")]: dict(zip(fields, row, strict=True)) for row in body["current"]["rows"]}
    assert rows["/__stream/:id"]["bytes_out"] == 200_000 and rows["/__stream/:id"]["bytes_in"] == 0
    assert rows["/echo"]["bytes_in"] == 100_000 and rows["/echo"]["bytes_out"] == len(echoed)


def test_repeated_decisions_count_exactly_whether_named_or_folded() -> None:
    """A decision seen before finds its row without being named again: the counts, the folded
    counts and the windows stay what naming every request gives."""
    a = UsageAggregator(max_clients=2, max_endpoints=2)
    for _ in range(3):
        for client in ("i10.0.0.1", "i10.0.0.2", "i10.0.0.3"):  # the third folds: over max_clients
            for path in ("/a/1", "/a/2", "/b/1", "/c/1"):  # /c folds: over max_endpoints
                a.record(_note(client), path)
                a.record(_note(client, status=0, outcome="limited"), path)
    w = a.take("src", 0, "ns")
    counts = {(r.client, r.endpoint, r.status): r.requests for r in w.rows}
    per_endpoint = {"/a/:id": 6, "/b/:id": 3, OTHER: 3}  # /a/1 and /a/2 are one endpoint
    assert counts == {(c, e, s): n for c in ("ip:10.0.0.1", "ip:10.0.0.2", OTHER)
                      for e, n in per_endpoint.items() for s in ("2xx", "none")}
    assert (w.folded_clients, w.folded_endpoints) == (24, 18)
    ok = next(r for r in w.rows if (r.client, r.endpoint, r.status) == ("ip:10.0.0.1", "/a/:id", "2xx"))
    assert (ok.latency_count, ok.latency_sum_us, ok.tokens, ok.bytes_in, ok.bytes_out) == (6, 6_000, 6, 60, 120)
    a.record(_note("i10.0.0.3"), "/c/1")  # the next window names anew: the third client fits now
    a.record(_note("i10.0.0.1"), "/a/1")  # and counts in its own rows, not the last window's
    assert [(r.client, r.endpoint, r.requests) for r in a.take("src", 1, "ns").rows] == \
        [("ip:10.0.0.3", "/c/:id", 1), ("ip:10.0.0.1", "/a/:id", 1)]


def _reference(requests: list[tuple[UsageNote, str]], max_clients: int, max_endpoints: int) -> list[usage.UsageRow]:
    """The rows of one window counted the plain way: each request named, bounded and added to
    its row on its own (what the aggregator's seen-decision shortcut must add up to)."""
    names = UsageAggregator(max_clients=1, max_endpoints=1)
    rows: dict[tuple[str, ...], usage.UsageRow] = {}
    clients: set[str] = set()
    endpoints: set[str] = set()
    for note, path in requests:
        for policy, truncate, raw, key_id, tier, rule, outcome, tokens in note:
            client = names.client_of(raw, key_id, truncate) if raw else "anonymous"
            endpoint = rule or endpoint_of(path)
            if client not in clients and len(clients) >= max_clients:
                client = OTHER
            clients.add(client)
            if endpoint not in endpoints and len(endpoints) >= max_endpoints:
                endpoint = OTHER
            endpoints.add(endpoint)
            key = (policy, client, tier, endpoint, outcome, status_class(note.status))
            row = rows.setdefault(key, usage.UsageRow(*key))
            row.requests += 1
            row.tokens += tokens
            row.bytes_in += note.bytes_in
            row.bytes_out += note.bytes_out
            if note.status:
                row.latency_sum_us += note.latency_us
                row.latency_count += 1
                row.latency_max_us = max(row.latency_max_us, note.latency_us)
                b = usage.latency_bucket(note.latency_us)
                row.histogram[b] = row.histogram.get(b, 0) + 1
    return list(rows.values())


_LATENCIES = st.one_of(st.sampled_from([0, 1, *usage.LATENCY_BOUNDS_US, *(b + 1 for b in usage.LATENCY_BOUNDS_US)]),
                       st.integers(min_value=0, max_value=10**10))
# (client, outcome, status, latency, its step between repeats, bytes in, bytes out, path, a second
# decision, tokens, repeats): few clients, paths and statuses, so that decisions repeat
_REQUEST = st.tuples(st.integers(0, 3), st.sampled_from(["allowed", "limited"]), st.sampled_from([0, 200, 999]),
                     _LATENCIES, st.sampled_from([0, 1, 997, 10**6, 3 * 10**7]), st.integers(0, 5),
                     st.integers(0, 10**6), st.sampled_from(["/a/1", "/b"]), st.booleans(), st.integers(0, 3),
                     st.integers(1, 40))


@given(st.lists(st.lists(_REQUEST, max_size=60), min_size=1, max_size=4))
def test_windows_are_exact_however_requests_repeat_and_windows_end(windows: list[list[tuple]]) -> None:  # type: ignore[type-arg]
    """Repeated decisions are added to their rows in batches (``_Pending``): whatever the mix
    (histogram bounds, unanswered and odd statuses, two decisions a request, folded clients and
    endpoints, batches cut anywhere), each window taken, and each look at the current one in
    between, holds exactly what counting request by request gives."""
    a = UsageAggregator(max_clients=3, max_endpoints=1)
    for seq, requests in enumerate(windows):
        made: list[tuple[UsageNote, str]] = []
        for i, (client, outcome, status, latency, step, bytes_in, bytes_out, path, two, tokens, repeats) \
                in enumerate(requests):
            for k in range(repeats):
                note = UsageNote()
                note.append(("ns/p", False, f"i10.0.0.{client}", "", "free", "", outcome, tokens))
                if two:
                    note.append(("cp", False, f"i10.0.0.{client}", "", "", "r", outcome, 1))
                note.status, note.latency_us = status, latency + k * step
                note.bytes_in, note.bytes_out = bytes_in, bytes_out
                a.record(note, path)
                made.append((note, path))
            if i == len(requests) // 2:  # a look in the middle changes nothing
                assert a.peek("s", seq, "ns").rows == _reference(made, 3, 1)
        w = a.take("s", seq, "ns")
        assert w.rows == _reference(made, 3, 1)
        assert usage.decode(usage.encode(w)) == w


def _sized_note(client: int, outcome: str, tokens: int, latency: int, size: int) -> UsageNote:
    note = UsageNote()
    note.append(("ns/p", False, f"i10.0.0.{client}", "", "free", "", outcome, tokens))
    note.status, note.latency_us, note.bytes_in, note.bytes_out = 200, latency, size, 2 * size
    return note


def test_decisions_past_the_fully_batched_ones_are_exact() -> None:
    """Past ``_MAX_BATCHED`` decisions in a window a decision's requests are summed every
    ``_SMALL_BATCH`` (what waits stays bounded): still exactly what counting request by request
    gives. The tokens a request took are part of its decision: 1,299 decisions, one row."""
    from sluice_sidecar import usage_aggregate

    decisions = 1_299
    assert usage_aggregate._MAX_BATCHED < decisions <= usage_aggregate._MAX_CACHED
    a = UsageAggregator(max_clients=10, max_endpoints=10)
    made: list[tuple[UsageNote, str]] = []
    for tokens in range(1, decisions + 1):
        for k in range(7):  # more than a small batch, less than a full one
            note = _sized_note(1, "allowed", tokens, 900 + 37 * k + tokens, k + tokens)
            a.record(note, "/a")
            made.append((note, "/a"))
    assert a.take("s", 0, "ns").rows == _reference(made, 10, 10)


def test_rows_past_the_row_bound_fold_then_drop_exactly() -> None:
    """Past half of ``max_rows`` a new row's client and endpoint fold into ``(other)``; past
    ``max_rows`` its requests are dropped and counted as dropped: with repeated decisions
    batched, every request is in exactly one row or in ``dropped``."""
    a = UsageAggregator(max_clients=100, max_endpoints=100, max_rows=4)
    want: dict[tuple[str, str], int] = {}  # (client, outcome) -> requests, the plain rule
    dropped = folded = 0
    for rep in range(40):
        for client in range(6):
            for outcome in ("allowed", "limited", "failed_open"):
                a.record(_sized_note(client, outcome, 1, 1000 + rep, rep), "/a")
                key = (f"ip:10.0.0.{client}", outcome)
                if key not in want and len(want) >= 2:
                    folded += 1  # each time: a folded request is never cached
                    key = (usage.OTHER, outcome)
                    if key not in want and len(want) >= 4:
                        dropped += 1
                        continue
                want[key] = want.get(key, 0) + 1
    w = a.take("s", 0, "ns")
    assert {(r.client, r.outcome): r.requests for r in w.rows} == want
    assert a.dropped == dropped and dropped > 0
    assert w.folded_clients == w.folded_endpoints == folded
    assert sum(want.values()) + dropped == 40 * 6 * 3
