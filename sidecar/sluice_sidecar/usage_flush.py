"""Usage analytics: the window writer. At each window's end, one ``XADD ... MAXLEN ~`` of the
window (:func:`sluice_core.usage.encode`) to :data:`~sluice_core.keyschema.USAGE_STREAM_KEY`.

Off the request path: its own task, and its own Redis connection (:class:`RedisNodes` of the
decision store's target, or of ``--usage-redis``), so a window of thousands of rows never queues
in front of the decisions pipelined on the store's connections.

A window Redis did not take (unreachable, timed out, refused) stays pending and is sent again,
first, at the next window's end, with the same ``(src, seq)``: when the lost reply of an XADD that
did land makes it arrive twice, the collector counts it once. After ``retries`` more attempts it
is dropped and counted (``sluice_usage_dropped_windows_total``); at most ``retries + 1`` windows
are ever pending. An empty window (no request) is not sent and takes no ``seq``: an idle sidecar
writes nothing. :meth:`UsageFlusher.close` (the drain after SIGTERM) takes the partial window and
makes one last attempt at everything pending.

``src`` is the pod name (else the host name) and a random suffix drawn at start: unique per
process start, so a restarted pod's ``seq`` starting at 0 again is a new source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass

from sluice_core import usage
from sluice_core.keyschema import USAGE_STREAM_KEY
from sluice_core.usage import UsageWindow

from sluice_sidecar.metrics import Metrics
from sluice_sidecar.transport.errors import TransportError
from sluice_sidecar.transport.resp import RedisReplyError, encode
from sluice_sidecar.transport.topology import RedisNodes
from sluice_sidecar.usage_aggregate import UsageAggregator

log = logging.getLogger("sluice.usage")
SEND_TIMEOUT_S = 5.0  # a window may be megabytes; it has its own connection, nobody waits on it


def new_source(pod_name: str | None) -> str:
    """This process's ``src``: its pod (or host) name and a random start id."""
    name = "".join(c for c in (pod_name or socket.gethostname() or "sidecar") if c.isascii() and c.isprintable())
    return f"{name[:200]}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class Pending:
    window: UsageWindow
    fields: dict[str, str]
    attempts: int = 0


class UsageFlusher:
    """Takes the aggregator's window every ``window_s`` and writes it (``nodes`` None: nowhere,
    the admin port's ``/usage`` only)."""

    def __init__(self, aggregator: UsageAggregator, nodes: RedisNodes | None, metrics: Metrics, *,
                 namespace: str, source: str, window_s: float, maxlen: int, retries: int) -> None:
        self.aggregator = aggregator
        self.nodes = nodes
        self.metrics = metrics
        self.namespace = namespace
        self.source = source
        self.window_s = window_s
        self.maxlen = maxlen
        self.retries = retries
        self.seq = 0  # the next window's
        self.last: UsageWindow | None = None  # the last window taken (for /usage)
        self.pending: deque[Pending] = deque()
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None  # the reason the last XADD failed (logged once a change)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # Windows end on multiples of window_s (wall clock): sidecars' windows line up, and a
        # collector's minute rollups split none of them when window_s divides a minute.
        while True:
            now = time.time()
            await asyncio.sleep(self.window_s - now % self.window_s)
            try:
                await self.flush()
            except Exception:  # a bug must not end usage counting for the life of the process
                log.exception("usage window flush failed")

    def current(self) -> UsageWindow:
        return self.aggregator.peek(self.source, self.seq, self.namespace)

    def _take(self) -> None:
        """Close the window: queued to be sent when it counted anything."""
        if not len(self.aggregator):
            self.aggregator.take(self.source, self.seq, self.namespace)  # restart the clock
            return
        window = self.aggregator.take(self.source, self.seq, self.namespace)
        self.seq += 1
        self.last = window
        if self.nodes is not None:
            self.pending.append(Pending(window, usage.encode(window)))

    async def flush(self) -> None:
        """Close the window and send what is pending, oldest first, until one fails."""
        self._take()
        while self.pending:
            p = self.pending[0]
            try:
                await self._send(p.fields)
            except RedisReplyError as exc:  # refused: OOM, an ACL, a MOVED before the map caught up
                if self.nodes is not None and self.nodes.cluster:
                    self.nodes.schedule_refresh()
                self._failed("refused", str(exc)[:120])
            except TransportError as exc:
                if self.nodes is not None:
                    self.nodes.rediscover()  # a Sentinel failover, a node gone: found again next time
                self._failed(exc.reason, str(exc))
            else:
                self.pending.popleft()
                self.metrics.usage_windows.inc()
                if self._error is not None:
                    log.info("usage windows are written to Redis again")
                    self._error = None
                continue
            # Not delivered this round (this one failed, the later ones wait behind it): one more
            # attempt used up by each; the oldest go first once past their retries.
            for q in self.pending:
                q.attempts += 1
            while self.pending and self.pending[0].attempts > self.retries:
                self.pending.popleft()
                self.metrics.usage_dropped_windows.inc()
            return

    async def _send(self, fields: dict[str, str]) -> None:
        assert self.nodes is not None
        conn = await self.nodes.for_key(USAGE_STREAM_KEY)
        await conn.send(encode("XADD", USAGE_STREAM_KEY, "MAXLEN", "~", self.maxlen, "*",
                               "v", fields["v"], "w", fields["w"]), SEND_TIMEOUT_S)

    def _failed(self, reason: str, detail: str) -> None:
        self.metrics.usage_errors.labels(reason).inc()
        if reason != self._error:
            log.warning("usage window not written to Redis (%s): kept for %d more attempts, then dropped",
                        detail, self.retries)
            self._error = reason

    async def close(self) -> None:
        """Stop the timer, then the last partial window and one last attempt at every pending
        one (the drain after SIGTERM); what still fails is counted dropped."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for p in self.pending:
            p.attempts = self.retries  # this is the last attempt for all of them
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S + 1):
                await self.flush()
        except TimeoutError:
            pass
        self.metrics.usage_dropped_windows.inc(len(self.pending))  # cut short by the timeout
        self.pending.clear()
        if self.nodes is not None:
            await self.nodes.close()
