"""Bursts of reconcile requests for one namespace share their runs.

Every key Secret event reconciles its namespace, and each reconcile reads all of the namespace's
key Secrets: at start-up (every Secret is listed) or after a bulk change, 10,000 Secrets cost
10,000 reconciles of 10,000 Secrets each. Here a request made while a run for the same key is
going waits for the next run, which starts when the current one ends and reads what is there
then: a burst of N requests costs two runs, and none misses a change (every request is answered
by a run that started after it was made)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._next: dict[str, asyncio.Future[T]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """``work()``'s result, from a run that started after this call."""
        waiting = self._next.get(key)
        if waiting is not None:  # a run not started yet will do: share it
            return await asyncio.shield(waiting)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._next[key] = future
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if self._next.get(key) is future:  # from now on, requests wait for the next run
                    del self._next[key]
                result = await work()
        except BaseException as exc:
            if self._next.get(key) is future:
                del self._next[key]
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            elif not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: the sharers re-raise it; none may be left
            raise
        future.set_result(result)
        return result

    def forget(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked() and key not in self._next:
            del self._locks[key]
