"""The interface every decision store implements."""

from __future__ import annotations

from typing import Protocol

from sluice_core.gcra import Reply

from sluice_sidecar.transport.errors import OOM, REFUSED, UNAVAILABLE

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


class DecisionStore(Protocol):
    """Check and take tokens from every bucket of one request, atomically.

    ``keys``: bucket keys (one hash tag); ``params``: ``(em_us, cap_us)`` per key, flattened;
    returns the script's :class:`~sluice_core.gcra.Reply` (its debts in the order of ``keys``),
    which :func:`~sluice_core.gcra.expand` turns into a decision.
    A ``cost`` of 0 only reads.
    """

    name: str

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply: ...

    def atomic(self, keys: tuple[str, ...]) -> bool:
        """Can one :meth:`decide` take all of ``keys`` (whatever their hash tags)?"""
        ...

    async def probe(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store can decide now (the circuit
        breaker's background check while it is open)."""
        ...

    async def close(self) -> None: ...
