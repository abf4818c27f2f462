"""What a decision means, from the few numbers the decision script returns.

The script (``scripts/decide.lua``) returns, per decision, ``allowed`` and each bucket's *debt*
(TAT − now, µs). Everything a caller reports follows from that and the bucket's EM/CAP, so it is
computed here, once, for both stores: Redis spends time on every reply element it converts.

The full reply, as every store returns it::

    [allowed, retry_us, (remaining, next_token_us, full_us) per bucket]
"""

from __future__ import annotations

from collections.abc import Sequence


def expand(allowed: int, debts: Sequence[int], cost: int, params: Sequence[int]) -> list[int]:
    retry = 0
    out = [allowed, 0]
    for i, debt in enumerate(debts):
        em, cap = params[2 * i], params[2 * i + 1]
        room = cap - debt
        if not allowed:
            retry = max(retry, debt + cost * em - cap)  # the wait until this bucket has room
        out += [max(0, room // em), em - room % em if debt > 0 else 0, debt]
    out[1] = retry
    return out
