"""A circuit breaker around the decision store.

Closed: every decision asks Redis. After ``threshold`` consecutive failures it opens: for
``cooldown`` seconds no decision waits on Redis (the policy's failure mode answers at once).
Then it half-opens: one probe decision goes through; success closes it, failure re-opens it.
This bounds the latency Redis trouble can add to ``timeout`` for a handful of requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, *, threshold: int = 5, cooldown: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = State.CLOSED
        self._on_change = on_change

    def allow(self) -> bool:
        """May this decision ask the store?"""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.cooldown:
                return False
            self._set(State.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._probing = False
            self._set(State.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self.threshold:
            self._probing = False
            self._opened_at = self._clock()
            self._set(State.OPEN)

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)
