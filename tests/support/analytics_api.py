"""The analytics API in the test's process (an aiohttp test server over given context), and
the standalone token the tests configure it with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sluice_analytics import dashboard, database, migrate, store
from sluice_analytics.api import ApiContext, routes
from sluice_analytics.auth import TokenFile
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from sluice_core.usage import UsageWindow

from support.loopback_app import serving
from support.sidecar_harness import policy_doc

TOKEN = "t0ps3cret-analytics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def api_client(ctx: ApiContext) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    app.add_routes(routes(ctx))
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await client.start_server()
    return client


class ServerThread:
    """The API on 127.0.0.1 in a thread with its own event loop (for callers that block: the
    CLI, schemathesis), over a SQLite store holding ``windows`` and a real Redis holding the
    policy ``shop/api``."""

    def __init__(self, tmp: Path, token_file: str, redis_url: str, windows: Sequence[UsageWindow]) -> None:
        self.windows = windows
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.url = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(tmp, token_file, redis_url), daemon=True)
        self.thread.start()
        if not self.ready.wait(60) or self.error:
            raise RuntimeError(f"the API did not start: {self.error!r}")

    def _run(self, tmp: Path, token_file: str, redis_url: str) -> None:
        try:
            self.loop.run_until_complete(self._serve(tmp, token_file, redis_url))
        except BaseException as exc:  # reported by __init__ (or lost at teardown)
            self.error = exc
            self.ready.set()

    async def _serve(self, tmp: Path, token_file: str, redis_url: str) -> None:
        engine = database.connect(f"sqlite:///{tmp / 'usage.db'}")
        await migrate.upgrade(engine)
        await store.apply(engine, self.windows, now_s=time.time(), keep_applied_s=10**9)  # windows of any age applied
        async with configstore.connect(redis_url) as redis:
            doc = policy_doc("api", "shop")
            await configstore.publish(redis, "shop", configdoc.build_doc("shop", [parse_policy(doc)]))
            app = web.Application()
            ctx = ApiContext(engine, TokenFile(token_file), redis)
            app.add_routes(routes(ctx))
            app.add_routes(dashboard.routes(ctx))
            async with serving(app) as self.url:
                self.ready.set()
                await self.stop.wait()
        await engine.dispose()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
