"""What usage analytics learn of one request while it is handled: the decisions the limiter made
(one per policy the request met) and, once forwarded, the upstream's answer.

The server makes one :class:`UsageNote` per request and makes it the current one
(:data:`CURRENT`, a context variable: each request runs in its own task, so concurrent requests
never see each other's note); the limiter appends to it at the point it counts a decision in
Prometheus, the proxy fills in the upstream's part, and the server hands it to the aggregator
(:mod:`sluice_sidecar.usage_aggregate`) when the request is done. A context variable rather
than a parameter: a decision is counted in ten places of the limiter and its key resolver, none
of which should carry a usage argument through the calls between them. Nothing here is
computed: the aggregator names and counts, after the response.
"""

from __future__ import annotations

from contextvars import ContextVar
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


class UsageNote:
    """One request's decisions and, when it was forwarded and answered, the upstream's part."""

    __slots__ = ("bytes_in", "bytes_out", "decisions", "latency_us", "status")

    def __init__(self) -> None:
        self.decisions: list[Decided] = []
        self.status = 0  # the upstream's status; 0: never answered (refused, unreachable)
        self.latency_us = 0  # until the upstream's response head
        self.bytes_in = 0  # request body bytes sent upstream
        self.bytes_out = 0  # response body bytes relayed


CURRENT: ContextVar[UsageNote | None] = ContextVar("sluice_usage_note", default=None)
"""The note of the request the running task handles; None when usage is off."""
