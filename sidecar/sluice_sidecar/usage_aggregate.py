"""Usage analytics: one flush window's counts, in memory and bounded whatever the traffic.

Each finished request's :class:`~sluice_sidecar.usage_note.UsageNote` becomes one dictionary
update per decision in it (:meth:`UsageAggregator.record`): its row, keyed by (policy, client,
tier, endpoint, outcome, upstream status class) as :class:`sluice_core.usage.UsageRow`, gains a
request, its tokens, its upstream latency (sum, count, max, histogram bucket) and its bytes.
At the window's end :meth:`UsageAggregator.take` hands the rows over as a
:class:`~sluice_core.usage.UsageWindow` and starts the next window empty.

Bounds, per window: at most ``max_clients`` clients and ``max_endpoints`` endpoints are counted
by name; a request of another client (endpoint) is counted under :data:`~sluice_core.usage.OTHER`
and in ``folded_clients`` (``folded_endpoints``). Rows are at most half of
:data:`~sluice_core.usage.MAX_ROWS` before a new key folds both its client and its endpoint (the
keys left, policy x tier x outcome x status, are few: the other half is their room); should even
that fill, the request is not counted (``dropped``). So memory is bounded by the settings, never
by the traffic: a flood of random clients or paths costs a set look-up each.

Speed: ``record`` runs once per request, so a decision already counted this window (the same
decision tuple, upstream status and rule or path: almost all of a steady traffic) is found in
one dictionary look-up (``_seen``, at most :data:`_MAX_CACHED` entries a window, never a folded
or a long path's) and its request's three figures are appended to the decision's
:class:`_Pending`, summed into the row a batch at a time and before the window is read: one list
extension a request instead of seven counter updates and a histogram update in bytecode
(bench.usage_instructions). Naming, bounds and folding run for new decisions only. What waits
in the batches is bounded too (see :data:`_BATCH`).

Names (``sluice_core.usage``: printable ASCII, at most 256 characters): a client is ``key:<key
id>`` (an API key, by the id of its grant or keys-file entry, never by the key), ``header:<16
characters of its digest>``, ``ip:<address>`` (an IPv6 client as the network its buckets use;
with the policy's ``spec.usage.truncateIPs`` an IPv4 address as its /24 and an IPv6 one as its
/48), ``anonymous`` where the request met no bucket. An endpoint is the matched rule's name, else
the path by :func:`endpoint_of`.
"""

from __future__ import annotations

import ipaddress
import time
from bisect import bisect_left, bisect_right
from typing import Any

from sluice_core import usage
from sluice_core.usage import LATENCY_BOUNDS_US, OTHER, UsageRow, UsageWindow

from sluice_sidecar.usage_note import Decided, UsageNote

ANONYMOUS = "anonymous"
MAX_SEGMENT = 64  # a longer path segment is an id, whatever it holds
_HEX = frozenset("0123456789abcdefABCDEF")
_STATUS = {1: "2xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}  # 1xx cannot end a request: as 2xx
_MAX_TRUNCATED = 4096  # IPv6 clients whose /48 is remembered (then the table starts over)
_MAX_CACHED = 4096  # clients' and paths' names remembered (then the table starts over), and rows in _seen
_MAX_CACHED_PATH = 256  # longer paths are named anew each time: the cache stays under ~1.5 MiB
# A _Pending's ints (three a request) before they are summed into its row: _BATCH for the first
# _MAX_BATCHED decisions of a window, _SMALL_BATCH for the rest, so that what waits to be summed
# stays under ~5.3 MiB whatever the traffic (tracemalloc: 1,024 decisions 31 requests deep and
# 3,072 three deep, every figure a distinct large int).
_BATCH = 3 * 32
_SMALL_BATCH = 3 * 4
_MAX_BATCHED = 1024
_LAST = len(LATENCY_BOUNDS_US)  # the histogram's last bucket: latencies above every bound


def _is_id(seg: str) -> bool:
    """Does a path segment name one object (a number, a UUID, long hex) or look hostile (long,
    not printable ASCII)? Linear in the segment, no regular expression on attacker input."""
    n = len(seg)
    if n > MAX_SEGMENT or not seg.isascii() or not seg.isprintable():
        return True
    if seg.isdigit():
        return True
    if n == 36 and seg[8] == seg[13] == seg[18] == seg[23] == "-":
        return _HEX.issuperset(seg.replace("-", ""))  # the four dashes, 32 hex digits
    return n >= 16 and _HEX.issuperset(seg)


def endpoint_of(path: str) -> str:
    """A request no rule matched, as its endpoint: the path (as sent, without its query) cut to
    its first two segments, each segment that names an id written ``:id`` (``/users/42/orders``
    -> ``/users/:id``). Splits at most three times, so a path of any length costs the same."""
    parts = path.split("/", 3)
    out = [":id" if _is_id(seg) else seg for seg in parts[1:3]]
    return "/" + "/".join(out)


def status_class(status: int) -> str:
    """The upstream's answer as :data:`sluice_core.usage.STATUS_CLASSES` (0: none)."""
    return _STATUS.get(status // 100, "none") if status else "none"


def _count(row: UsageRow, tokens: int, answered: bool, figures: tuple[int, int, int]) -> None:
    """One request into its row: ``figures`` is (upstream latency µs, bytes in, bytes out),
    the latency counted only when the upstream ``answered``."""
    latency, bytes_in, bytes_out = figures
    row.requests += 1
    row.tokens += tokens
    row.bytes_in += bytes_in
    row.bytes_out += bytes_out
    if answered:
        row.latency_sum_us += latency
        row.latency_count += 1
        if latency > row.latency_max_us:
            row.latency_max_us = latency
        b = bisect_left(LATENCY_BOUNDS_US, latency)  # == usage.latency_bucket, in C
        row.histogram[b] = row.histogram.get(b, 0) + 1


class _Pending(list[int]):
    """The requests of one decision (``UsageAggregator._seen``) not yet added to its row: three
    ints each, (upstream latency µs, bytes in, bytes out), appended by the hot path in one
    ``+=`` and summed into the row by :meth:`fold` every ``limit`` ints (:data:`_BATCH`) and
    before the window is read. Everything else about the requests is the same for all of them: the row,
    the tokens each took (part of the decision) and whether the upstream answered (its status,
    part of the ``_seen`` key), so a request costs a list extension instead of seven counter
    updates and a histogram update in Python bytecode; the fold sums in C and sorts the latencies,
    so that it finds each histogram bucket's run with two binary searches."""

    __slots__ = ("answered", "limit", "row", "tokens")

    def __init__(self, row: UsageRow, tokens: int, answered: bool, limit: int) -> None:
        super().__init__()
        self.row = row
        self.tokens = tokens
        self.answered = answered
        self.limit = limit  # fold at this many ints

    def fold(self) -> None:
        """The pending requests into the row, exactly as :func:`_count` one at a time would."""
        row = self.row
        n = len(self) // 3
        row.requests += n
        row.tokens += n * self.tokens
        row.bytes_in += sum(self[1::3])
        row.bytes_out += sum(self[2::3])
        if self.answered:
            latencies = self[0::3]
            latencies.sort()  # then each bucket is a run: two binary searches a bucket, not one a request
            row.latency_sum_us += sum(latencies)
            row.latency_count += n
            if latencies[-1] > row.latency_max_us:
                row.latency_max_us = latencies[-1]
            hist = row.histogram
            i = 0
            while i < n:
                b = bisect_left(LATENCY_BOUNDS_US, latencies[i])  # == usage.latency_bucket, in C
                j = bisect_right(latencies, LATENCY_BOUNDS_US[b], i) if b < _LAST else n
                hist[b] = hist.get(b, 0) + j - i
                i = j
        self.clear()


class UsageAggregator:
    """The current window's rows; see the module docstring for the bounds."""

    def __init__(self, *, max_clients: int, max_endpoints: int, max_rows: int = usage.MAX_ROWS) -> None:
        self.max_clients = max_clients
        self.max_endpoints = max_endpoints
        self.max_rows = max_rows
        self.dropped = 0  # requests not counted at all (every row taken): all windows so far
        self._truncated: dict[str, str] = {}  # an IPv6 client -> its /48
        self._names: dict[tuple[str, str, bool], str] = {}  # (client, key id, truncate) -> name
        self._paths: dict[str, str] = {}  # path -> endpoint
        self._start_ms = int(time.time() * 1000)
        self._rows: dict[tuple[str, str, str, str, str, str], UsageRow] = {}
        # (decision, upstream status, rule or path) -> its row this window: see record()
        self._seen: dict[tuple[Decided, int, str], _Pending] = {}
        self._clients: set[str] = set()
        self._endpoints: set[str] = set()
        self._folded_clients = 0
        self._folded_endpoints = 0

    def client_of(self, client: str, key_id: str, truncate_ips: bool) -> str:
        """A bucket client id (:mod:`sluice_core.keyschema`) as usage names it."""
        kind = client[:1]
        if kind == "k":
            return f"key:{key_id}"[: usage.MAX_TEXT]
        if kind == "h":
            return "header:" + client[1:]
        if kind == "i":
            return "ip:" + (self._truncate(client[1:]) if truncate_ips else client[1:])
        return ANONYMOUS

    def _truncate(self, ip: str) -> str:
        if ":" not in ip:  # IPv4: the common case, no parsing
            head, dot, _ = ip.rpartition(".")
            return f"{head}.0/24" if dot else ip
        net = self._truncated.get(ip)
        if net is None:
            try:  # an IPv6 client is already its network ("2001:db8:1:2::/64")
                net = str(ipaddress.ip_network(ip, strict=False).supernet(new_prefix=48))
            except ValueError:
                net = ip
            if len(self._truncated) >= _MAX_TRUNCATED:
                self._truncated.clear()
            self._truncated[ip] = net
        return net

    def record(self, note: UsageNote, path: str) -> None:
        """Count one finished request (``path``: as sent, without its query). The hot part of
        usage counting: a decision seen before this window (the same decision tuple, upstream
        status and rule or path) finds its :class:`_Pending` in one dictionary look-up
        (``_seen``) and gains the request's three figures in one list extension; only a new one
        is named, bounded and folded (:meth:`_row`)."""
        figures = (note.latency_us, note.bytes_in, note.bytes_out)
        status = note.status
        seen = self._seen
        for d in note:
            pending = seen.get((d, status, d[5] or path))
            if pending is None:
                self._record_new(d, status, path, figures)
                continue
            pending += figures  # list.extend, in C: the counters are summed at the fold
            if len(pending) >= pending.limit:
                pending.fold()

    def _record_new(self, d: Decided, status: int, path: str, figures: tuple[int, int, int]) -> None:
        """:meth:`record` of a decision not in ``_seen``: its row found or made (:meth:`_row`),
        then counted into a new :class:`_Pending` kept in ``_seen`` (when nothing folded, for
        paths up to :data:`_MAX_CACHED_PATH` and at most :data:`_MAX_CACHED` decisions a
        window), else straight into the row (a folded request comes here each time, so the
        folded counts stay exact)."""
        row, cache = self._row(d, status, path)
        if row is None:
            return
        seen = len(self._seen)
        if cache and seen < _MAX_CACHED and len(path) <= _MAX_CACHED_PATH:
            limit = _BATCH if seen < _MAX_BATCHED else _SMALL_BATCH
            pending = self._seen[(d, status, d[5] or path)] = _Pending(row, d[7], status != 0, limit)
            pending += figures
            if len(pending) >= limit:
                pending.fold()
        else:
            _count(row, d[7], status != 0, figures)

    def _row(self, d: Decided, status: int, path: str) -> tuple[UsageRow | None, bool]:
        """The row of a decision: its client and endpoint named, each folded past its bound
        (counted), the row made if new (None: dropped, every row taken); and whether nothing
        folded (so that later requests of the decision may go straight to the row)."""
        policy, truncate_ips, raw, key_id, tier, rule, outcome, _ = d
        folded = False
        client = ANONYMOUS
        if raw:
            client = self._names.get((raw, key_id, truncate_ips)) or self._name((raw, key_id, truncate_ips))
        endpoint = rule or self._endpoint(path)
        if client not in self._clients:
            if len(self._clients) < self.max_clients:
                self._clients.add(client)
            else:
                client, folded = OTHER, True
                self._folded_clients += 1
        if endpoint not in self._endpoints:
            if len(self._endpoints) < self.max_endpoints:
                self._endpoints.add(endpoint)
            else:
                endpoint, folded = OTHER, True
                self._folded_endpoints += 1
        key = (policy if outcome != "skipped" else "", client, tier, endpoint, outcome, status_class(status))
        row = self._rows.get(key)
        if row is None:
            row = self._new_row(key)
            if row is None or row.key != key:  # dropped, or folded into the (other) row
                return row, False
        return row, not folded

    def _name(self, raw: tuple[str, str, bool]) -> str:
        """:meth:`client_of`, remembered (at most :data:`_MAX_CACHED` clients, then anew)."""
        name = self.client_of(*raw)
        if len(self._names) >= _MAX_CACHED:
            self._names.clear()
        self._names[raw] = name
        return name

    def _endpoint(self, path: str) -> str:
        """:func:`endpoint_of`, remembered for short paths (a long one is never kept)."""
        e = self._paths.get(path)
        if e is None:
            e = endpoint_of(path)
            if len(path) <= _MAX_CACHED_PATH:
                if len(self._paths) >= _MAX_CACHED:
                    self._paths.clear()
                self._paths[path] = e
        return e

    def _new_row(self, key: tuple[str, str, str, str, str, str]) -> UsageRow | None:
        """A row for a key not seen this window; past half of ``max_rows`` the key's client and
        endpoint fold (counted), and past ``max_rows`` the request is dropped (None)."""
        rows = self._rows
        if len(rows) >= self.max_rows // 2:
            policy, client, tier, endpoint, outcome, status = key
            if client != OTHER:
                self._folded_clients += 1
            if endpoint != OTHER:
                self._folded_endpoints += 1
            key = (policy, OTHER, tier, OTHER, outcome, status)
            row = rows.get(key)
            if row is not None:
                return row
            if len(rows) >= self.max_rows:
                self.dropped += 1
                return None
        row = rows[key] = UsageRow(*key)
        return row

    def take(self, source: str, seq: int, namespace: str) -> UsageWindow:
        """The window so far (ending now), and a new empty one started."""
        now_ms = int(time.time() * 1000)
        window = self.peek(source, seq, namespace, now_ms)
        self._start_ms = now_ms
        self._rows = {}
        self._seen = {}
        self._clients = set()
        self._endpoints = set()
        self._folded_clients = self._folded_endpoints = 0
        return window

    def peek(self, source: str, seq: int, namespace: str, now_ms: int | None = None) -> UsageWindow:
        """The window so far, left in place (rows shared: read it before the next request)."""
        for pending in self._seen.values():  # the requests not yet in their rows
            if pending:
                pending.fold()
        end = int(time.time() * 1000) if now_ms is None else now_ms
        return UsageWindow(source, seq, namespace, self._start_ms, max(end, self._start_ms),
                           list(self._rows.values()), self._folded_clients, self._folded_endpoints)

    def __len__(self) -> int:
        return len(self._rows)


def window_json(window: UsageWindow | None) -> dict[str, Any] | None:
    """A window as the admin port's ``/usage`` shows it: the stream entry's JSON (names and
    counts only: a key by its id, never the key)."""
    if window is None:
        return None
    import json

    body: dict[str, Any] = json.loads(usage.encode(window)["w"])
    body["fields"] = list(usage.ROW_FIELDS)
    return body
