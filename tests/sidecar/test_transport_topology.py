"""The Redis topology (:mod:`sluice_sidecar.transport.topology`) as its users meet it, against a
real Redis Cluster."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid

import pytest
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from sluice_core.redisurl import parse_redis_url
from sluice_core.yamltext import load
from sluice_sidecar.configsource import RedisSource
from sluice_sidecar.enforcement import Enforcement
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.stores.redis import RedisStore
from support.redis_servers import RedisClusterProcs, RedisServer, pick_port

POLICY = """
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api, namespace: %s}
spec:
  tiers: [{name: free, requests: 5, period: 1m}]
"""


@pytest.mark.cluster
async def test_change_notices_reach_a_cluster_sidecar_whose_first_node_is_down(
        redis_cluster: RedisClusterProcs) -> None:
    """Any node of a Cluster serves the subscription: with the first node of the URL down (it
    failed, or was replaced) the change notice still arrives, not only at the next poll."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    url = f"redis+cluster://127.0.0.1:{pick_port()}," + redis_cluster.url.split("://", 1)[1]
    store = RedisStore(parse_redis_url(url), timeout=1.0, connect_timeout=0.5)
    applied: list[Enforcement | None] = []
    source = RedisSource(store.nodes, ns, Metrics(), lambda policy, _: applied.append(policy),
                         labels_path=None, poll_interval=3600)  # no poll within the test
    client = configstore.connect(redis_cluster.url)
    try:
        await source.start()
        policy = parse_policy(load(POLICY % ns))
        version = await configstore.publish(client, ns, configdoc.build_doc(ns, [policy]))
        deadline = time.monotonic() + 10
        while not any(e is not None and e.version == version for e in applied):
            assert time.monotonic() < deadline, "the change notice never arrived"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()
        await source.close()
        await store.close()


async def test_a_refused_heartbeat_leaves_no_unretrieved_error(
        fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The heartbeat's ZADD and PEXPIRE go out together; a refused ZADD (here an ACL that
    forbids it) is an error the heartbeat handles, not a future nobody awaited (asyncio then
    logs "Future exception was never retrieved" at garbage collection, as an ERROR). It is
    said: counted every time, one WARNING line for the reason (not one per heartbeat)."""
    fresh_redis.execute("ACL", "SETUSER", "default", "on", "nopass", "~*", "&*", "+@all", "-zadd")
    ns = f"t{uuid.uuid4().hex[:10]}"
    store = RedisStore(parse_redis_url(fresh_redis.url), timeout=1.0, connect_timeout=0.5)
    metrics = Metrics()
    source = RedisSource(store.nodes, ns, metrics, lambda policy, _: None, labels_path=None,
                         pod_name="web-0", poll_interval=3600, heartbeat_interval=0.01)
    caplog.set_level(logging.WARNING, logger="sluice")
    try:
        await source.start()
        deadline = time.monotonic() + 10
        while fresh_redis.execute("INFO", "commandstats").get("cmdstat_pexpire", {}).get("calls", 0) < 5:
            assert time.monotonic() < deadline, "the heartbeat never ran"
            await asyncio.sleep(0.02)
    finally:
        await source.close()
        await store.close()
    gc.collect()
    await asyncio.sleep(0)  # one loop turn, not a wait: the callbacks close() scheduled run, and a dropped future they fail is logged then
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    warnings = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(warnings) == 1 and "(auth)" in warnings[0] and "NOPERM" in warnings[0], warnings
    assert (metrics.registry.get_sample_value("sluice_heartbeat_errors_total", {"reason": "auth"})
            or 0) >= 4  # each heartbeat before the fifth PEXPIRE was answered and counted
