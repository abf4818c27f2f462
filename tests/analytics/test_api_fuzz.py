"""The analytics API fuzzed from its own OpenAPI document (schemathesis): every operation, valid
and invalid inputs, a bounded number of examples each: never a 5xx, and every answer conforms
to the document (status codes, content types, bodies). The server runs in a thread of its own
(schemathesis calls it synchronously) over a SQLite store with data and a real Redis."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.checks
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from sluice_analytics import database, migrate, store
from sluice_analytics.api import ApiContext, routes
from sluice_analytics.auth import TokenFile
from sluice_analytics.openapi import document
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from support.analytics_api import AUTH
from support.redis_servers import RedisServer
from support.sidecar_harness import policy_doc
from support.usage_windows import Writer

EXAMPLES = 60  # per operation: bounded, so the file runs in seconds


class ServerThread:
    """The API on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, tmp: Path, token_file: str, redis_url: str) -> None:
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
        now = 1_790_000_000
        await store.apply(engine, Writer(sources=2, clients=8).windows(4), now_s=now, keep_applied_s=86400)
        async with configstore.connect(redis_url) as redis:
            doc = policy_doc("api", "shop")
            await configstore.publish(redis, "shop", configdoc.build_doc("shop", [parse_policy(doc)]))
            app = web.Application()
            app.add_routes(routes(ApiContext(engine, TokenFile(token_file), redis)))
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self.ready.set()
            await self.stop.wait()
            await runner.cleanup()
        await engine.dispose()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture
def served(tmp_path: Path, token_file: str, redis_server: RedisServer) -> Iterator[str]:
    server = ServerThread(tmp_path, token_file, redis_server.url)
    try:
        yield server.url
    finally:
        server.close()


SCHEMA = schemathesis.openapi.from_dict(document())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_fuzzed_operations_never_fail(served: str, operation: Any) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Every check but "valid data accepted": the document cannot say every rule (a range
        # too large for its step, a date that does not exist), which the API answers with 400.
        case.call_and_validate(base_url=served, headers=AUTH,
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])

    check()
