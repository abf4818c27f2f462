"""What the near-limit alert tests share: a real HTTP receiver on loopback, a sidecar's usage
window, the webhook counter read from the metrics registry, and the sender's delivery loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import generate_latest
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.webhooks import WebhookSender
from sluice_core.usage import UsageRow, UsageWindow

from support.loopback_app import serving


def window(ns: str, seq: int, start_s: int, used: dict[tuple[str, str], int], policy: str = "") -> UsageWindow:
    """One sidecar's window in which each (client, tier) took ``tokens`` tokens, one each, of
    ``policy`` (the usage rows' ref; ``ns/api`` when left out)."""
    rows = [UsageRow(policy=policy or f"{ns}/api", client=client, tier=tier, endpoint="/", outcome="allowed",
                     status="2xx", requests=n, tokens=n) for (client, tier), n in used.items()]
    return UsageWindow(source=f"pod-{ns}/run1", seq=seq, namespace=ns, start_ms=start_s * 1000,
                       end_ms=(start_s + 10) * 1000, rows=rows)


@dataclass
class Receiver:
    """A real HTTP server on loopback taking webhook POSTs; answers the queued statuses first."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=self.answers.pop(0) if self.answers else 200)


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A :class:`Receiver` on 127.0.0.1, its URL ``/hook/s3cret-token`` (a token in the path)."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", rec.handle)
    async with serving(app) as url:
        rec.url = f"{url}/hook/s3cret-token"
        yield rec


def sent(metrics: AnalyticsMetrics, result: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(f'sluice_analytics_alert_webhooks_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.asynccontextmanager
async def running(sender: WebhookSender) -> AsyncIterator[None]:
    """The sender's delivery loop, stopped (and awaited) on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
