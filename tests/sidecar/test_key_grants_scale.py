"""Many API keys in Redis cost a sidecar nothing it would not pay without them: one namespace's
policy has 200,000 grants in Redis (a sidecar that held them would take tens of MB more, and
Redis would send it megabytes), another's none; a real sidecar process of each
starts, serves its keys, and sees one key change. Their memory (RSS) is the same within a few MB,
and Redis sends each the same bytes at start-up and for a key change: nothing that grows with
the number of keys. (Times, and a million keys, are bench/keys_sidecar.py's, not asserted here.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from support.grant_store import fill_grants, key_policy, publish_policies, put_key, revoke_key
from support.key_sidecar import start, status
from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess
from support.redis_servers import RedisServer

KEYS = 200_000
RSS_SLACK_KB = 4 * 1024  # two processes doing the same work differ by less than this
BYTES_SLACK = 2048  # the same commands, and replies that differ only in names and numbers


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sent_bytes(redis: RedisServer) -> int:
    """What Redis has sent to all its clients so far."""
    with redis.client() as r:
        return int(r.info("stats")["total_net_output_bytes"])


def measured_sidecar(redis: RedisServer, upstream_process: UpstreamProcess, ns: str, labels: Path,
                     keys: list[str]) -> tuple[SidecarProcess, int, int, float]:
    """A sidecar of ``ns`` started (subscribed) and warmed up with ``keys``: (sidecar, bytes
    Redis sent it to start, its RSS in kB, seconds from launch to subscribed)."""
    before = sent_bytes(redis)
    began = time.monotonic()
    sidecar = start(upstream_process, redis.url, ns, labels)
    took = time.monotonic() - began
    start_bytes = sent_bytes(redis) - before
    try:
        assert [status(sidecar, key) for key in keys * 50] == [200] * len(keys) * 50
    except BaseException:
        sidecar.close()
        raise
    return sidecar, start_bytes, rss_kb(sidecar.proc.pid), took


@pytest.mark.slow
def test_many_keys_cost_a_sidecar_nothing(fresh_redis: RedisServer, upstream_process: UpstreamProcess,
                                               labels: Path, record_property: Callable[[str, object], None]) -> None:
    few, many = "few-" + uuid.uuid4().hex[:6], "many-" + uuid.uuid4().hex[:6]
    keys = [f"key-{i}-{uuid.uuid4().hex}" for i in range(20)]
    for ns in (few, many):
        policy = key_policy(ns, required=True, pro=1_000_000)
        publish_policies(fresh_redis.url, ns, policy)
        for key in keys:
            put_key(fresh_redis.url, policy.ref, key, "pro")
    fill_grants(fresh_redis.url, key_policy(many).ref, KEYS, "pro")
    with fresh_redis.client() as r:
        assert r.dbsize() >= KEYS

    small, small_bytes, small_rss, small_start = measured_sidecar(fresh_redis, upstream_process, few, labels, keys)
    try:
        big, big_bytes, big_rss, big_start = measured_sidecar(fresh_redis, upstream_process, many, labels, keys)
        # Start-up, reported (the junit XML's properties), not asserted: times are the bench's.
        record_property("start_up_s_no_keys", round(small_start, 3))
        record_property("start_up_s_many_keys", round(big_start, 3))
        try:
            assert abs(big_rss - small_rss) < RSS_SLACK_KB, (small_rss, big_rss)
            assert abs(big_bytes - small_bytes) < BYTES_SLACK, (small_bytes, big_bytes)
            # One key change: a notice naming the key, to every sidecar; a revoked key is refused.
            before = sent_bytes(fresh_redis)
            revoke_key(fresh_redis.url, key_policy(many).ref, keys[0])
            wait_until(lambda: status(big, keys[0]) == 401, 10, what="revoked key refused")
            assert sent_bytes(fresh_redis) - before < 64 * 1024  # a notice and a few replies
        finally:
            big.close()
    finally:
        small.close()


def test_fill_grants_writes_what_it_says(fresh_redis: RedisServer) -> None:
    fill_grants(fresh_redis.url, "ns/api", 1234, "pro", chunk=500)
    with fresh_redis.client() as r:
        assert r.dbsize() == 1234
        key = next(iter(r.scan_iter(count=10)))
        assert key.decode().endswith("}:g") and r.get(key).startswith(b"2|pro|")
