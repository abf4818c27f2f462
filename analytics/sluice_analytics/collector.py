"""The collector's loops: read a batch, apply it in one transaction, acknowledge it; the rollup
and retention job; the lag gauge; the usage summary for the policies' status. A failure of Redis or of the database is counted, logged
once per change, and retried with back-off: the loop never ends on one and never skips an
entry it has not applied (unacknowledged entries stay pending and are read again)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice_core import usagesummary
from sluice_core.configstore import REDIS_FAILURES, ConfigStoreError
from sluice_core.usage import UsageFormatError, UsageWindow, decode
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics import crashpoints, rollup, store, summary
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import NearLimitAlerts
from sluice_analytics.settings import AnalyticsSettings
from sluice_analytics.stream import UsageStream

log = logging.getLogger("sluice.analytics")
DB_FAILURES = (SQLAlchemyError, OSError)  # asyncpg's connection errors surface as OSError too
LAG_INTERVAL_S = 5.0


@dataclass
class Health:
    """What ``/healthz`` reports: the last time each side answered, the last error."""

    redis_ok_at: float = 0.0
    db_ok_at: float = 0.0
    error: str = ""
    started_at: float = field(default_factory=time.monotonic)


class Backoff:
    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.delay = first, cap, 0.0

    def next(self) -> float:
        self.delay = min(self.cap, self.delay * 2 or self.first)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


class Collector:
    def __init__(self, settings: AnalyticsSettings, engine: AsyncEngine, stream: UsageStream,
                 metrics: AnalyticsMetrics, *, clock: Callable[[], float] = time.time,
                 near_limit: NearLimitAlerts | None = None,
                 side_loops: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = ()) -> None:
        self.settings, self.engine, self.stream, self.metrics = settings, engine, stream, metrics
        self.clock = clock
        self.near_limit = near_limit
        self.side_loops = list(side_loops)  # e.g. the webhook sender's: stopped with the rest
        self.health = Health()
        self.retention = rollup.Retention(
            keep_s={"minute": settings.keep_minutes_h * 3600, "hour": settings.keep_hours_d * 86400,
                    "day": settings.keep_days_d * 86400},
            keep_applied_s=settings.keep_applied_h * 3600, delete_batch=settings.delete_batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Every loop until ``stop`` is set; a batch in flight finishes first."""
        loops = [asyncio.create_task(loop(stop)) for loop in
                 (self._consume, self._rollups, self._lag, self._summaries, self._alerts, *self.side_loops)]
        try:
            await stop.wait()
            await asyncio.wait(loops, timeout=self.settings.block_ms / 1000 + 10)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _consume(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                await self.step()
                backoff.reset()
                continue
            except REDIS_FAILURES as exc:
                self.metrics.redis_errors.inc()
                self.stream.retry_pending()  # what was read and not acknowledged: read again
                self._failed("redis", exc)
            except DB_FAILURES as exc:
                self.metrics.db_errors.inc()
                self.stream.retry_pending()
                self._failed("database", exc)
            await _sleep(stop, backoff.next())

    def _failed(self, what: str, exc: BaseException) -> None:
        error = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if error != self.health.error:  # once per change, not once per retry
            log.error("%s (retrying)", error)
        self.health.error = error

    async def step(self) -> int:
        """One batch: read, decode (setting bad entries aside), apply, acknowledge. The count of
        entries handled."""
        entries = await self.stream.read(self.settings.batch)
        self.health.redis_ok_at = time.monotonic()
        windows: list[UsageWindow] = []
        ids: list[str] = []
        for entry_id, fields in entries:
            try:
                windows.append(decode(fields))
                ids.append(entry_id)
            except UsageFormatError as exc:
                # The reason names the field; the entry itself is kept aside, not logged.
                await self.stream.reject(entry_id, fields, str(exc))
                log.warning("usage entry %s set aside: %s", entry_id, exc)
                self.metrics.bad.inc()
        if windows:
            started = time.perf_counter()
            applied = await store.apply(self.engine, windows, now_s=self.clock(),
                                        keep_applied_s=self.retention.keep_applied_s)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.health.db_ok_at = time.monotonic()
            crashpoints.reach("after_commit")
            await self.stream.ack(ids)
            self._count(applied)
            # Acknowledged is not deleted: drop what every group is done with, so the stream
            # in the buckets' Redis holds only what is unconsumed (stream.py says why MINID).
            self.metrics.trimmed.inc(await self.stream.trim())
        if self.health.error:
            log.info("usage collector recovered: %s", self.health.error)
            self.health.error = ""
        return len(entries)

    def _count(self, applied: store.Applied) -> None:
        m = self.metrics
        m.windows.inc(applied.windows)
        m.requests.inc(applied.requests)
        m.rows.inc(applied.rows)
        m.duplicates.inc(applied.duplicates)
        m.stale.inc(applied.stale)
        if applied.stale:
            log.warning("%d usage window(s) refused as stale (older than --keep-applied-h)", applied.stale)

    async def rollup_once(self) -> rollup.RunResult:
        result = await rollup.run_once(self.engine, self.retention, now_s=self.clock(),
                                       delay_s=self.settings.rollup_delay_s)
        self.metrics.rollup_runs.inc()
        return result

    async def _rollups(self, stop: asyncio.Event) -> None:
        """Rollup and retention, and the group's gone consumers forgotten, once an interval."""
        while not stop.is_set():
            try:
                await self.rollup_once()
            except DB_FAILURES as exc:
                self.metrics.db_errors.inc()
                log.error("rollup and retention run failed (next in %.0f s): %s",
                          self.settings.rollup_interval_s, exc)
            await self.forget_consumers_once()
            await _sleep(stop, self.settings.rollup_interval_s)

    async def forget_consumers_once(self) -> list[str]:
        try:
            gone = await self.stream.forget_idle_consumers(self.settings.forget_consumers_idle_h * 3600)
        except REDIS_FAILURES:
            return []  # the consume loop counts and logs Redis failures; next interval
        if gone:
            self.metrics.consumers_forgotten.inc(len(gone))
            log.info("forgot %d consumer(s) of the usage group, idle and with nothing pending: %s",
                     len(gone), ", ".join(sorted(gone))[:500])
        return gone

    async def _alerts(self, stop: asyncio.Event) -> None:
        """Near-limit alerts, once an interval (none without a detector)."""
        while self.near_limit is not None and not stop.is_set():
            every = self.settings.alerts_interval_s
            try:
                before = self.near_limit.suppressed
                self.metrics.near_limit.inc(len(await self.near_limit.run_once(self.clock())))
                self.metrics.near_limit_suppressed.inc(self.near_limit.suppressed - before)
                self.metrics.near_limit_passes.inc()
            except DB_FAILURES as exc:
                self.metrics.db_errors.inc()
                log.error("near-limit alerts: the database failed (next in %.0f s): %s", every, exc)
            except (*REDIS_FAILURES, ConfigStoreError) as exc:
                self.metrics.redis_errors.inc()
                log.error("near-limit alerts: Redis failed (next in %.0f s): %s", every, exc)
            except Exception:  # a bug must not end the alerts for the collector's life: said, retried
                log.exception("near-limit alerts failed (next in %.0f s)", every)
            await _sleep(stop, every)

    async def summarise_once(self) -> int | None:
        """Write each policy's last hour to Redis (:mod:`sluice_core.usagesummary`) if no other
        replica did this interval; how many policies (None: another replica's turn)."""
        interval = self.settings.summary_interval_s
        if not await usagesummary.claim(self.stream.client, self.stream.consumer, interval):
            return None
        now = self.clock()
        policies = await summary.compute(self.engine, now)
        # Three intervals (at least the default's), so a late write never lets it lapse.
        ttl = max(usagesummary.TTL_S, 3 * interval)
        written = await usagesummary.write(self.stream.client, policies, at=int(now), ttl_s=ttl)
        self.metrics.summaries.inc()
        return written

    async def _summaries(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.summarise_once()
            except (*REDIS_FAILURES, ConfigStoreError) as exc:
                self.metrics.redis_errors.inc()
                log.warning("usage summary not written (next in %.0f s): %s", self.settings.summary_interval_s, exc)
            except DB_FAILURES as exc:
                self.metrics.db_errors.inc()
                log.warning("usage summary not computed (next in %.0f s): %s", self.settings.summary_interval_s, exc)
            await _sleep(stop, self.settings.summary_interval_s)

    async def _lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                lag = await self.stream.lag()
                self.metrics.lag_entries.set(lag.entries)
                self.metrics.lag_seconds.set(lag.seconds)
            except REDIS_FAILURES:
                pass  # the consume loop counts and logs Redis failures
            await _sleep(stop, LAG_INTERVAL_S)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
