"""The interface every decision store implements."""

from __future__ import annotations

from typing import Protocol


class StoreUnavailable(Exception):
    """The store could not decide in time (timeout, connection refused, cluster trouble).

    Raised once, at the storage boundary, whatever the underlying error was; the message says
    what happened without echoing keys or credentials."""


class DecisionStore(Protocol):
    """Check and take tokens from every bucket of one request, atomically.

    ``keys``: bucket keys (one hash tag); ``params``: ``(em_us, cap_us)`` per key, flattened;
    returns the decision script's reply: ``[allowed, retry_us, (remaining, next_us, full_us) * n]``.
    A ``cost`` of 0 only reads.
    """

    name: str

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> list[int]: ...

    def atomic(self, keys: tuple[str, ...]) -> bool:
        """Can one :meth:`decide` take all of ``keys`` (whatever their hash tags)?"""
        ...

    async def close(self) -> None: ...
