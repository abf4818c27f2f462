"""In-memory decision store: the decision script's exact arithmetic in Python.

For the embedded demo and single-replica use (it is per process: replicas would each have their
own limit). Memory is bounded: expired buckets are swept incrementally, and past ``max_buckets``
the least recently written bucket is dropped (that client then starts with a full bucket)."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable

from sluice_core.gcra import Reply, Resolved
from sluice_core.sidecar_settings import DEFAULT_MAX_BUCKETS

from sluice_sidecar.stores.base import ResolveAsk


def _now_us() -> int:
    return time.time_ns() // 1_000


class MemoryStore:
    name = "memory"

    def __init__(self, *, max_buckets: int = DEFAULT_MAX_BUCKETS, clock_us: Callable[[], int] = _now_us) -> None:
        # Write order, oldest first; OrderedDict drops its oldest entry in O(1) (a plain dict
        # scans the holes left at its front by earlier deletions: O(n) per write at the cap).
        self._tat: OrderedDict[str, int] = OrderedDict()
        self._max = max_buckets
        self._clock = clock_us
        self._sweep_every = 1024
        self._writes = 0

    def __len__(self) -> int:
        return len(self._tat)

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply:
        return self.decide_now(keys, cost, params)

    async def resolve(self, ask: ResolveAsk) -> Resolved:
        """No grants live here (standalone mode keeps its keys in memory): every key is unknown."""
        if not ask.fallback_keys:
            return Resolved(None, None)
        return Resolved(None, self.decide_now(ask.fallback_keys, ask.cost, ask.fallback_params))

    def atomic(self, keys: tuple[str, ...]) -> bool:
        return True

    async def probe(self) -> None:
        return None  # memory never goes away

    def decide_now(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply:
        now = self._clock()
        tats: list[int] = []
        news: list[int] = []
        allowed = 1
        for i, key in enumerate(keys):
            tat = self._tat.get(key, now)
            if tat < now:
                tat = now
            new = tat + cost * params[2 * i]
            if cost > 0 and new - now > params[2 * i + 1]:
                allowed = 0
            tats.append(tat)
            news.append(new)
        debts = [(new if allowed else tat) - now for tat, new in zip(tats, news, strict=True)]
        out = Reply(allowed == 1, debts)
        if allowed and cost < 0:  # a refund; a bucket full again is no bucket (as in the script)
            for key, new in zip(keys, news, strict=True):
                if new <= now:
                    self._tat.pop(key, None)
                else:
                    self._tat[key] = new
                    self._tat.move_to_end(key)
        elif allowed and cost > 0:
            tat_map = self._tat
            for key, new in zip(keys, news, strict=True):
                tat_map[key] = new
                tat_map.move_to_end(key)  # order is write order (oldest first)
            self._writes += 1
            if self._writes % self._sweep_every == 0:
                self._sweep(now)
            while len(tat_map) > self._max:  # at the cap: drop the oldest, O(1), no sweep
                tat_map.popitem(last=False)
        return out

    def _sweep(self, now: int) -> None:
        # Oldest writes come first; a bucket whose TAT has passed is full again, so dropping it
        # changes nothing. Then enforce the size cap.
        tat_map = self._tat
        for key in list(itertools.islice(tat_map, 4 * self._sweep_every)):
            if tat_map[key] <= now:
                del tat_map[key]
        while len(tat_map) > self._max:
            tat_map.popitem(last=False)

    async def close(self) -> None:
        self._tat.clear()
