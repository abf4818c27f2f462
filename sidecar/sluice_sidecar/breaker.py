"""A circuit breaker around the decision store, and the store's failure reason as operators see it.

Closed: every decision asks the store. After ``threshold`` consecutive failures that cost
waiting (timeouts, refused or lost connections, failed authentication) it opens: no decision
waits on the store (the policy's failure mode answers at once). While it is open a background
task probes the store with what a decision does, under the decision timeout (reconnect,
authenticate, run the decision script once on a key no bucket uses), first ``cooldown`` seconds
after it opened, then every ``probe_interval`` seconds (0.1) while Redis is unreachable or
slower than the decision timeout (every ``cooldown`` while it answers with an error, e.g. a
wrong password), and closes it as soon as one probe succeeds. No client request is spent on
probing: once the store is back, the next request is decided by it. The pauses are never
shorter than ``probe_interval``. The store is also probed once at start (:meth:`start`): a
failure there is logged and opens the breaker at once.

Error replies that come back at once (``OOM``, other refusals) are failures for the metrics and
the log but do not open the breaker: they cost no waiting, and the first decision after Redis
recovers is served.

Failures that switch limiting off (or to 503, per each policy's ``failureMode``) are logged at
ERROR with their reason once per change of reason (an open breaker, or a fast refusal), and the
recovery once at WARNING; a reason flapping on and off is not logged again within
``LOG_REPEAT_S``. Isolated timeouts that do not open the breaker are only counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum

from sluice_sidecar.stores.base import FAST_REASONS, StoreUnavailable
from sluice_sidecar.transport.errors import TIMEOUT, UNAVAILABLE

log = logging.getLogger("sluice.store")
PROBE_INTERVAL_S = 0.1  # a refused connect costs next to nothing: Redis back, served within ~0.1 s
LOG_REPEAT_S = 60.0


class State(IntEnum):
    CLOSED = 0
    OPEN = 1


class CircuitBreaker:
    def __init__(self, *, probe: Callable[[], Awaitable[None]], threshold: int,
                 cooldown: float, probe_interval: float = PROBE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None,
                 on_probe: Callable[[bool], None] | None = None) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.probe_interval = probe_interval
        self._probe = probe
        self._clock = clock
        self._failures = 0
        self.state = State.CLOSED
        self.reason: str | None = None  # why the store is failing now; None while it decides
        self._logged: dict[str | None, float] = {}  # reason (None: recovery) -> last logged at
        self._on_change = on_change
        self._on_probe = on_probe
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Task[None] | None = None  # the probe at start

    def allow(self) -> bool:
        """May this decision ask the store?"""
        return self.state is State.CLOSED

    def success(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._set(State.CLOSED)
        if self.reason is not None:
            was, self.reason = self.reason, None
            if self._may_log(None):
                log.warning("decision store deciding again (it was failing: %s)", was)

    def failure(self, exc: StoreUnavailable) -> None:
        if exc.reason in FAST_REASONS:  # answered at once: nothing to protect clients from
            self._report(exc)
            return
        self._failures += 1
        if self.state is State.OPEN:  # a failed probe: the reason may have changed
            self._report(exc)
        elif self._failures >= self.threshold:
            self._open(exc)

    def _open(self, exc: StoreUnavailable) -> None:
        self._report(exc)
        self._set(State.OPEN)
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.ensure_future(self._probe_until_closed())

    def start(self) -> None:
        """Probe the store once, in the background (start-up never waits for Redis, nor refuses
        to start without it: it may come later). When Redis is unreachable or refuses (a wrong
        password) the reason is logged at ERROR and the breaker opens, so it is said at start,
        not after client requests failed, and the background probe takes over; a slow answer
        counts as one failure towards the threshold."""
        if self._first is None:
            self._first = asyncio.ensure_future(self._probe_at_start())

    async def _probe_at_start(self) -> None:
        try:
            await self._probe()
        except StoreUnavailable as exc:
            if exc.reason in FAST_REASONS:  # answered at once: decisions will say it themselves
                self._report(exc)
            elif exc.reason == TIMEOUT:
                # One slow first answer (a cold Redis, a TLS handshake) is one failure towards
                # the threshold, as for a decision: opening on it would answer every request by
                # the failure mode for a cooldown.
                log.warning("decision store slow at start (%s); counted as one failure", exc.reason)
                self.failure(exc)
            elif self.state is State.CLOSED:  # not opened by client requests meanwhile
                self._open(exc)
        except Exception:  # a probe bug must not stop the sidecar; decisions still report
            log.exception("decision store probe crashed")

    async def _probe_until_closed(self) -> None:
        await asyncio.sleep(max(self.cooldown, self.probe_interval))
        while self.state is State.OPEN:
            # Floored: a cooldown of 0 would re-authenticate a wrong password back to back.
            pause = max(self.cooldown, self.probe_interval)
            try:
                await self._probe()
            except StoreUnavailable as exc:
                self._probed(False)
                self.failure(exc)
                if exc.reason in (UNAVAILABLE, TIMEOUT):
                    # Gone or stalled: a refused connect costs nothing, a stalled one waited its
                    # timeout already; probe again soon. A Redis that answers and refuses (a
                    # wrong password) is asked once per cooldown: retrying will not fix it.
                    pause = self.probe_interval
            except Exception:  # never let the prober die with the breaker open
                self._probed(False)
                log.exception("decision store probe crashed")
            else:
                self._probed(True)
                self.success()
                return
            await asyncio.sleep(pause)

    def _probed(self, ok: bool) -> None:
        if self._on_probe is not None:
            self._on_probe(ok)

    def _report(self, exc: StoreUnavailable) -> None:
        if exc.reason == self.reason:
            return
        self.reason = exc.reason
        if self._may_log(exc.reason):
            log.error("decision store failing (%s): %s; until it recovers each policy's "
                      "failureMode decides (open: not limited, closed: 503)", exc.reason, exc)

    def _may_log(self, reason: str | None) -> bool:
        """Once per change, but a reason flapping on and off is said once per LOG_REPEAT_S."""
        now = self._clock()
        last = self._logged.get(reason)
        if last is not None and now - last < LOG_REPEAT_S:
            return False
        self._logged[reason] = now
        return True

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    async def close(self) -> None:
        for task in (self._first, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._first = self._task = None
