"""Waiting for a condition with a deadline (never a fixed sleep as synchronisation): every
polling helper of the tests, sync (:func:`poll`, :func:`wait_until`) and async
(:func:`wait_for`, :func:`eventually`, :func:`wait_stable`)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def poll(predicate: Callable[[], Any], what: str, timeout: float = 30.0, *, interval: float = 0.1,
         diagnose: Callable[[], str] | None = None, ignore: tuple[type[Exception], ...] = ()) -> Any:
    """Call ``predicate`` until it returns something truthy (returned); fail with the last value
    (and ``diagnose()``) after ``timeout`` seconds. An exception in ``ignore`` is a "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){extra}")
        time.sleep(interval)


def wait_until(predicate: Any, timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """:func:`poll` for processes: an ``OSError`` (nothing listening yet) is a "not yet"."""
    return poll(predicate, what, timeout, interval=interval, ignore=(OSError,))


async def wait_for(probe: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05,
                   what: str = "condition", ignore: tuple[type[Exception], ...] = ()) -> Any:
    """Call ``probe`` (which may return an awaitable) until it returns something truthy; return
    that, or fail after ``timeout``. An exception in ``ignore`` is a "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = probe()
            if inspect.isawaitable(last):
                last = await last
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def eventually(probe: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """:func:`wait_for` of the operator tests: a lookup that fails (not there yet) is a "not yet"."""
    return await wait_for(probe, timeout=timeout, what=what, ignore=(KeyError, LookupError))


async def wait_stable(value: Callable[[], int], *, quiet: float = 0.5, timeout: float = 30.0,
                      what: str = "a counter") -> int:
    """Poll ``value`` until it has not changed for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while True:
        await asyncio.sleep(0.02)
        now, current = time.monotonic(), value()
        if current != last:
            last, since = current, now
        elif now - since >= quiet:
            return current
        if now > deadline:
            raise AssertionError(f"{what} kept changing for {timeout:.0f}s (now {current})")
