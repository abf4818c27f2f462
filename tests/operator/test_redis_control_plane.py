"""The control plane's Redis boundary (``sluice_core.configstore``) on asyncio: the operator's
Redis calls run on its event loop, not in threads; a hung or unreachable Redis ends them with an
error (the client's timeouts bound every wait) and the loop serves other tasks meanwhile.
Real redis-servers; the operator's closing of its client at exit is in test_operator_kmock.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sluice_core import configstore, keyschema
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.reconcile import Reconciler
from support.redis_servers import RedisServer, pick_port
from support.sidecar_harness import policy_doc


class NoThreads(concurrent.futures.ThreadPoolExecutor):
    """An event loop's default executor that refuses work: ``asyncio.to_thread`` fails (asyncio
    wants a ThreadPoolExecutor there; this one never starts a thread)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        raise AssertionError(f"a thread was asked to run {fn!r}")


@pytest.fixture
async def no_threads() -> AsyncIterator[None]:
    asyncio.get_running_loop().set_default_executor(NoThreads())
    yield


async def test_the_operator_reaches_redis_without_a_thread(fresh_redis: RedisServer, no_threads: None) -> None:
    """Every Redis call of the reconcile loop: the cluster document, a namespace's config,
    heartbeats read and pruned, the memory settings, a deleted namespace's document dropped."""
    ns = "nt-" + uuid.uuid4().hex[:8]
    async with configstore.connect(fresh_redis.url) as client:
        reconciler = Reconciler(client)
        assert await reconciler.start_counting()
        assert await reconciler.ensure_cluster_doc()
        assert await reconciler.cluster_doc_exists()
        out = await reconciler.reconcile(ns, [policy_doc("api", ns)], [])
        assert out.programmed and out.pushed and not out.redis_error, out
        assert await reconciler.intact()
        key = keyschema.heartbeat_key(ns)  # a sidecar of an older release, and a gone one
        fresh_redis.execute("HSET", key, "web-0", keyschema.Heartbeat(out.version, time.time(), "api").encode(),
                            "web-1", keyschema.Heartbeat(out.version, 0.0, "api").encode())
        beat = keyschema.Heartbeat(out.version, 0.0, "api", capabilities=frozenset())
        fresh_redis.execute("ZADD", keyschema.HEARTBEATS_KEY, str(int(time.time())),
                            keyschema.heartbeat_member(ns, "web-2", beat),
                            "1", keyschema.heartbeat_member(ns, "web-3", beat))
        beats = HeartbeatView(client, stale_s=30)
        await beats.refresh([ns])
        assert beats.count([ns], "api", out.version) == 2
        assert fresh_redis.execute("HKEYS", key) == [b"web-0"]  # the stale ones pruned
        assert fresh_redis.execute("ZCARD", keyschema.HEARTBEATS_KEY) == 1
        assert await reconciler.memory_check.run() is None  # no maxmemory: safe
        await reconciler.reconcile(ns, [], [], complete=True)  # its last policy deleted: an empty document
        await reconciler.forget(ns)
        assert not fresh_redis.execute("EXISTS", keyschema.config_key(ns))


@pytest.mark.slow
async def test_a_hung_redis_ends_the_reconcile_with_an_error_and_the_loop_runs_on(
        fresh_redis: RedisServer, no_threads: None) -> None:
    """SIGSTOP: connections are accepted and nothing answers. Without a read timeout the
    reconcile would wait forever; with it (and its retries) it ends with ``redis_error``, and
    the event loop served other tasks all along."""
    ns = "hung-" + uuid.uuid4().hex[:8]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async with configstore.connect(fresh_redis.url, timeout=0.1) as client:
        reconciler = Reconciler(client)
        fresh_redis.pause()
        ticker = asyncio.create_task(tick())
        try:
            out = await reconciler.reconcile(ns, [policy_doc("api", ns)], [])
        finally:
            ticker.cancel()
            fresh_redis.resume()
    assert out.redis_error and not out.programmed, out
    assert out.results["api"].accepted  # validated all the same
    assert ticks > 1


async def test_an_unreachable_cluster_is_a_redis_error_not_a_crash(no_threads: None) -> None:
    """A Cluster client meets its nodes at the first command; none answering is a Redis error
    like any other (the operator reports it and retries), never an exception out of the loop."""
    ns = "nocl-" + uuid.uuid4().hex[:8]
    async with configstore.connect(f"redis+cluster://127.0.0.1:{pick_port()}", timeout=0.5) as client:
        reconciler = Reconciler(client)
        out = await reconciler.reconcile(ns, [policy_doc("api", ns)], [])
        # Our wording (configstore's), not redis-py's, which may change in any release.
        assert out.redis_error and out.redis_error.startswith(f"cannot read config for namespace {ns!r}: "), out
        assert not await reconciler.ensure_cluster_doc()
        with pytest.raises(configstore.ConfigStoreError):
            await HeartbeatView(client, stale_s=30).refresh([ns])
        assert not await reconciler.intact()
        assert await reconciler.memory_check.run() is None
        with pytest.raises(configstore.ConfigStoreError):
            await configstore.read(client, ns)


async def test_a_redis_that_never_answers_is_asked_twice_at_most() -> None:
    """A hung Redis (it accepts connections, never replies) costs one attempt and one retry (a
    dropped connection at a failover deserves one), not redis-py's default of ten retries: the
    reconcile holds its namespace's lock meanwhile, so each attempt is a timeout of waiting."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # never answers

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with configstore.connect(f"redis://127.0.0.1:{port}", timeout=0.2) as client:
            with pytest.raises(configstore.ConfigStoreError):
                await configstore.read_raw(client, "hung")
        assert 1 <= len(accepted) <= 2, f"{len(accepted)} connections to a Redis that never answers"
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
