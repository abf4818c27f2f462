"""Named points where a test makes the collector die, deterministically.

``SLUICE_ANALYTICS_CRASH_AT=NAME[:N]`` makes the process SIGKILL itself the N-th time (default
the first) it reaches the point ``NAME``: ``before_commit`` (a batch's SQL written, not
committed) or ``after_commit`` (committed, not acknowledged in Redis). A signal from the test
at a random moment would land between batches nearly always; a debugger would change timing.
Without the variable a point costs one dict lookup. The variable is read once, at import.
"""

from __future__ import annotations

import os
import signal

ENV = "SLUICE_ANALYTICS_CRASH_AT"
POINTS = ("before_commit", "after_commit")

_name, _, _nth = os.environ.get(ENV, "").partition(":")
_left = {_name: int(_nth or 1)} if _name in POINTS else {}


def reach(point: str) -> None:
    """Die here if the environment asked for it (SIGKILL: no cleanup, like an OOM kill)."""
    if point in _left:
        _left[point] -= 1
        if _left[point] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
