"""What usage analytics learn of one request while it is handled: the decisions the limiter made
(one per policy the request met) and, once forwarded, the upstream's answer.

The server makes one :class:`UsageNote` per request and hands it to the limiter
(``Limiter.decide(..., note)``), which appends to it at the point it counts a decision in
Prometheus, and to the proxy, which fills in the upstream's part; when the request is done the
server gives it to the aggregator (:mod:`sluice_sidecar.usage_aggregate`). An argument, not a
context variable: a ``ContextVar`` set and reset per request cost ~3,000 instructions and left
the note in the finished task's context, for the garbage collector to find (bench.usage_sidecar).
Nothing here is computed: the aggregator names and counts, after the response.
"""

from __future__ import annotations

from typing import TypeAlias

Decided: TypeAlias = tuple[str, bool, str, str, str, str, str, int]
"""One policy's decision on a request, as the limiter knew it: ``(policy, truncate_ips, client,
key_id, tier, rule, outcome, tokens)`` -- the policy's ref as usage names it
(usage.UsageRow.policy, "" for none), its ``spec.usage.truncateIPs``, the bucket client id
(keyschema: k…, h…, i…; "" when not identified), an API key's id (client k…, else ""), the
tier, the matched rule's name ("" when none matched), one of sluice_core.usage.OUTCOMES, and the
tokens taken from the buckets (the cost when allowed, else 0).

A plain tuple, not a NamedTuple: one is built per policy on every request, and a NamedTuple's
constructor (a Python-level ``__new__``) costs ten times a tuple display (callgrind: ~3,300
instructions against ~310). It is also, whole, part of the aggregator's look-up key
(usage_aggregate.UsageAggregator.record)."""


class UsageNote(list[Decided]):
    """One request's decisions (the list's items) and, when it was forwarded and answered, the
    upstream's part. A list itself rather than an object holding one: the note lives until the
    request ends, across its awaits, and each object of that kind the garbage collector tracks
    makes its young collections come sooner (bench.usage_sidecar: with usage on the sidecar ran
    ~1.5x the young collections of ``--usage off``); one fewer per request."""

    __slots__ = ("bytes_in", "bytes_out", "latency_us", "status")

    def __init__(self) -> None:
        self.status = 0  # the upstream's status; 0: never answered (refused, unreachable)
        self.latency_us = 0  # until the upstream's response head
        self.bytes_in = 0  # request body bytes sent upstream
        self.bytes_out = 0  # response body bytes relayed
