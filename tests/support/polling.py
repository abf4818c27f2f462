"""Waiting for a condition with a deadline (never a fixed sleep as synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def poll(predicate: Callable[[], Any], what: str, timeout: float = 30.0, *, interval: float = 0.1,
         diagnose: Callable[[], str] | None = None) -> Any:
    """Call ``predicate`` until it returns something truthy (returned); fail with the last value
    (and ``diagnose()``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")
        time.sleep(interval)
