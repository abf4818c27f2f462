"""What a decision means, from the few numbers the decision script returns.

The script (``scripts/decide.lua``) returns, per decision, ``allowed`` and each bucket's *debt*
(TAT − now, µs). Everything a caller reports follows from that and the bucket's EM/CAP, so it is
computed here, once, for both stores (Redis spends time on every reply element it converts).

Stores return the script's :class:`Reply` as it is; the limiter expands it into a
:class:`Decision` for the policy that asked. A pod under two policies takes both policies'
buckets in one script call and expands each policy's share of the reply on its own, so a reply is
never expanded twice (measured: expanding the joint reply first cost about 1 µs a request).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

# NamedTuples rather than frozen dataclasses: built on every request, and measured cheaper
# (CPython 3.11, one bucket: 0.68 us against 0.96 us for a frozen slotted dataclass). expand()
# builds them with tuple.__new__, skipping the generated __new__ (another 0.15 us a request).


class Reply(NamedTuple):
    """The decision script's reply for one decision."""

    allowed: bool
    debts: Sequence[int]  # per bucket, in the order asked for: TAT − now, µs (0: full)


class Resolved(NamedTuple):
    """The decision script's reply for one "resolve" decision (an API key resolved from its
    Redis grant in the same call): the grant's stored value (:mod:`sluice_core.grants`), None
    for an unknown key; and the decision over the buckets it took (the key's, or the fallback
    buckets of an unknown key), None when an unknown key had none to fall back to."""

    grant: str | None
    reply: Reply | None


class BucketState(NamedTuple):
    """One bucket after a decision (before it, when the decision was a refusal)."""

    remaining: int  # whole tokens left
    next_us: int  # until the next token (0: the bucket is full)
    full_us: int  # until the bucket is full again: its debt, TAT − now


class Decision(NamedTuple):
    """One decision over a request's buckets, in the order they were asked for."""

    allowed: bool
    retry_us: int  # refused: the wait until every bucket holds the request's cost (0: allowed)
    buckets: tuple[BucketState, ...]

    def short_bucket(self, cost: int) -> int | None:
        """The index of the first bucket that does not hold ``cost`` tokens (the one that
        refuses), or None when every bucket has room."""
        for i, b in enumerate(self.buckets):
            if b.remaining < cost:
                return i
        return None


def expand(reply: Reply, cost: int, params: Sequence[int]) -> Decision:
    """The decision a script ``reply`` means, for a request of ``cost`` tokens over buckets with
    ``params`` = ``(em_us, cap_us)`` per bucket, flattened."""
    # Written for the hot path (every request; once per policy): a
    # running index instead of enumerate() and 2 * i, a conditional instead of max(0, ...).
    # Measured (CPython 3.11, 2 buckets): 0.50 us, where the first typed version took 0.79 us
    # and the untyped list it replaced 0.51 us.
    allowed, debts = reply
    retry = 0
    buckets = []
    new = tuple.__new__
    i = 0
    for debt in debts:
        em = params[i]
        cap = params[i + 1]
        i += 2
        room = cap - debt
        if not allowed:
            retry = max(retry, debt + cost * em - cap)  # the wait until this bucket has room
        # BucketState(remaining, next_us, full_us)
        buckets.append(new(BucketState, (room // em if room > 0 else 0, em - room % em if debt > 0 else 0, debt)))
    return new(Decision, (allowed, retry, tuple(buckets)))
