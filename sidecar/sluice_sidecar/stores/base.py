"""The interface every decision store implements."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

from sluice_core.gcra import Reply, Resolved

from sluice_sidecar.transport.errors import OOM, REFUSED, UNAVAILABLE
from sluice_sidecar.transport.resp import Encoded

# Reasons (:mod:`sluice_sidecar.transport.errors`) that mean Redis answered at once: they cost
# no waiting, so they do not open the breaker.
FAST_REASONS = frozenset({OOM, REFUSED})


class StoreUnavailable(Exception):
    """The store could not decide: no answer in time, no connection, cluster trouble, or Redis
    refused (a wrong password, ``OOM``, another error reply).

    Raised once, at the storage boundary, whatever the underlying error was; the message says
    what happened without echoing keys or credentials; ``reason`` is the transport's
    (:mod:`sluice_sidecar.transport.errors`: the ``reason`` label of ``sluice_store_errors_total``)."""

    def __init__(self, message: str, reason: str = UNAVAILABLE) -> None:
        super().__init__(message)
        self.reason = reason


def tier_args(policy_tag: str, tiers: Iterable[tuple[str, str, int, int]]) -> Encoded:
    """The resolve decision's policy arguments: the policy's tag (:func:`sluice_core.grants
    .policy_tag`: a grant with another is not this policy's), the tiers' count, then name,
    bucket suffix, EM, CAP per tier."""
    flat = [x for tier in tiers for x in tier]
    return Encoded.of(policy_tag, len(flat) // 4, *flat)


class ResolveAsk(NamedTuple):
    """A decision for an API key whose grant lives in Redis (``scripts/decide.lua``'s "resolve"
    decision): the script reads the grant at ``grant_key``, picks the bucket from ``tiers`` (the
    policy's tiers, encoded once per policy load: :func:`tier_args`) or the key's own limit, and
    decides it with the ``rule_keys``; an unknown key takes the ``fallback_keys`` instead (none:
    nothing is decided or written)."""

    grant_key: str
    cost: int
    rule_keys: tuple[str, ...]
    rule_params: tuple[int, ...]
    fallback_keys: tuple[str, ...]
    fallback_params: tuple[int, ...]
    tiers: Encoded

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.grant_key, *self.rule_keys, *self.fallback_keys)


class DecisionStore(Protocol):
    """Check and take tokens from every bucket of one request, atomically.

    ``keys``: bucket keys (one hash tag); ``params``: ``(em_us, cap_us)`` per key, flattened;
    returns the script's :class:`~sluice_core.gcra.Reply` (its debts in the order of ``keys``),
    which :func:`~sluice_core.gcra.expand` turns into a decision.
    A ``cost`` of 0 only reads.
    """

    name: str

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply: ...

    async def resolve(self, ask: ResolveAsk) -> Resolved:
        """Resolve an API key from its Redis grant and decide in the same atomic call."""
        ...

    def atomic(self, keys: tuple[str, ...]) -> bool:
        """Can one :meth:`decide` take all of ``keys`` (whatever their hash tags)?"""
        ...

    async def probe(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store can decide now (the circuit
        breaker's background check while it is open)."""
        ...

    async def close(self) -> None: ...
