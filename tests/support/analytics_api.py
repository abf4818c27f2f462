"""The analytics API in the test's process (an aiohttp test server over given context), and
the standalone token the tests configure it with."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sluice_analytics.api import ApiContext, routes

TOKEN = "t0ps3cret-analytics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def api_client(ctx: ApiContext) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    app.add_routes(routes(ctx))
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await client.start_server()
    return client
