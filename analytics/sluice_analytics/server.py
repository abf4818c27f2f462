"""``/metrics`` and ``/healthz`` of ``sluice analytics`` (aiohttp, on ``--listen``), and the API
(``/openapi.json``, ``/v1/...``: :mod:`sluice_analytics.api`) on the same port.

One port rather than a second listener: one Service, one port to probe and scrape, nothing more to
configure; the API authenticates every call itself, and ``/metrics`` / ``/healthz`` carry no
client data (as before).

``/healthz`` is 200 while the collector talks to Redis (a read, even an empty one, within the
last ``stale_s``) and no failure is outstanding; otherwise 503 with the reason: a liveness
probe then restarts a collector that is stuck, not one that merely has nothing to do."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sluice_analytics import dashboard
from sluice_analytics.api import ApiContext, routes
from sluice_analytics.collector import Collector


def app(collector: Collector, *, stale_s: float, api: ApiContext | None = None) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(collector.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        h = collector.health
        now = time.monotonic()
        since = now - (h.redis_ok_at or h.started_at)
        ok = not h.error and since < stale_s
        body = {"status": "ok" if ok else "failing", "error": h.error,
                "redis_seconds_ago": round(now - h.redis_ok_at, 1) if h.redis_ok_at else None,
                "db_seconds_ago": round(now - h.db_ok_at, 1) if h.db_ok_at else None}
        return web.json_response(body, status=200 if ok else 503)

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/healthz", healthz)
    if api is not None:
        application.add_routes(routes(api))
        application.add_routes(dashboard.routes(api))  # the page at / and its two reads
    return application


async def serve(collector: Collector, host: str, port: int, *, stale_s: float,
                api: ApiContext | None = None) -> tuple[web.AppRunner, int]:
    """Start serving; the runner (to clean up) and the bound port (``port`` 0: any free one)."""
    runner = web.AppRunner(app(collector, stale_s=stale_s, api=api), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
