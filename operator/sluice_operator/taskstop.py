"""Stopping the operator's own background tasks, for sure.

A task that is cancelled once does not always stop: on Python < 3.12 ``asyncio.wait_for`` drops
a cancellation that arrives in the loop iteration where what it waits for has just completed
(CPython gh-86296), and redis-py writes every command under ``asyncio.wait_for``. A resync
cancelled at that moment sweeps on as if nothing happened, and a stop that awaits it waits
forever: kopf's cleanup never ends, and the pod stays until it is killed (seen in CI: the
operator's thread still sweeping 20 s after its stop flag). So cancellations are repeated until
the tasks are done."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

AGAIN_S = 0.5
"""How long a cancelled task has to end before it is cancelled again."""


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], again_s: float = AGAIN_S) -> None:
    """Cancel ``tasks`` and wait until every one is done, cancelling again those that are not
    after ``again_s``. Their errors were logged where they happened: retrieved here, not raised.
    A cancellation of the caller propagates (it is not taken for one of theirs)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning at garbage collection
