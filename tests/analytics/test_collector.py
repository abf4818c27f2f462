"""``sluice analytics`` as a process against a real Redis and a real database (SQLite and
PostgreSQL): what the windows carried is what is stored, exactly, through crashes at both sides
of the commit, a dead replica, two replicas at once, a Redis restart and bad entries."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster
from sluice_core import keyschema
from support.analytics_process import CollectorProcess
from support.polling import poll
from support.postgres import PostgresServer
from support.processes import http_get
from support.redis_servers import RedisClusterProcs, RedisServer
from support.usage_windows import StoredView, Writer, xadd_sync

pytestmark = pytest.mark.slow
RECENT_MS = int(time.time() * 1000) - 600_000  # windows from the last minutes (older ones are stale)


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    yield started
    for c in started:
        c.stop()


def _all_applied(view: StoredView, redis: RedisServer, windows: int, timeout: float = 60) -> None:
    poll(lambda: view.applied() == windows, f"{windows} windows applied", timeout=timeout,
         diagnose=lambda: f"applied: {view.applied()}")
    # and acknowledged: nothing left pending in the group
    poll(lambda: redis.client().xpending(keyschema.USAGE_STREAM_KEY, keyschema.USAGE_GROUP)["pending"] == 0,
         "every entry acknowledged", timeout=timeout)


def test_many_sources_are_stored_exactly(fresh_redis: RedisServer, database_url: str,
                                         collectors: list[CollectorProcess]) -> None:
    writer = Writer(sources=12, clients=200, start_ms=RECENT_MS)
    collectors.append(CollectorProcess(fresh_redis.url, database_url))
    r = fresh_redis.client()
    for _ in range(5):  # written while the collector runs
        xadd_sync(r, writer.windows(8))
    view = StoredView(database_url)
    _all_applied(view, fresh_redis, 12 * 8 * 5)
    assert view.totals() == writer.totals
    assert collectors[0].metric("sluice_analytics_duplicates_skipped_total") == 0
    assert collectors[0].metric("sluice_analytics_requests_applied_total") == sum(writer.totals.values())


def test_bad_entries_are_set_aside_counted_and_acknowledged(fresh_redis: RedisServer, database_url: str,
                                                           collectors: list[CollectorProcess]) -> None:
    writer = Writer(sources=2, start_ms=RECENT_MS)
    r = fresh_redis.client()
    key = keyschema.USAGE_STREAM_KEY
    xadd_sync(r, writer.windows(2))
    bad = [{"v": "9", "w": "{}"}, {"v": "1", "w": "not json"}, {"v": "1"},
           {"v": "1", "w": '{"src":"x","seq":1,"ns":"n","start":1,"end":0,"rows":[],"folded":[0,0]}'}]
    for fields in bad:
        r.xadd(key, fields)
    xadd_sync(r, writer.windows(2))
    collectors.append(c := CollectorProcess(fresh_redis.url, database_url))
    view = StoredView(database_url)
    _all_applied(view, fresh_redis, 8)
    assert view.totals() == writer.totals
    poll(lambda: c.metric("sluice_analytics_bad_entries_total") == len(bad), "bad entries counted")
    kept = r.xrange(keyschema.USAGE_REJECTED_KEY)
    assert [f[b"reason"].split(b":")[0] for _, f in kept] == [b"v", b"w", b"w", b"w.end"]
    # the whole log: at debug level the driver's lines soon push the warning out of any tail
    log = c.log.read_text(errors="replace")
    assert "usage entry" in log and "w.end: before w.start" in log


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_collector_killed_at_its_commit_loses_and_doubles_nothing(
        point: str, fresh_redis: RedisServer, database_url: str, collectors: list[CollectorProcess]) -> None:
    writer = Writer(sources=6, start_ms=RECENT_MS)
    r = fresh_redis.client()
    xadd_sync(r, writer.windows(10))  # 60 windows: three batches of 20
    dying = CollectorProcess(fresh_redis.url, database_url, crash_at=f"{point}:2")
    assert dying.wait_died() == -signal.SIGKILL
    view = StoredView(database_url)
    assert view.applied() == (20 if point == "before_commit" else 40)  # batch 2 committed or not
    collectors.append(again := CollectorProcess(fresh_redis.url, database_url))  # same consumer name
    _all_applied(view, fresh_redis, 60)
    assert view.totals() == writer.totals
    duplicates = again.metric("sluice_analytics_duplicates_skipped_total")
    assert duplicates == (0 if point == "before_commit" else 20)  # batch 2 read again, skipped


def test_a_dead_replicas_entries_are_claimed_by_another(fresh_redis: RedisServer, database_url: str,
                                                        collectors: list[CollectorProcess]) -> None:
    writer = Writer(sources=4, start_ms=RECENT_MS)
    r = fresh_redis.client()
    xadd_sync(r, writer.windows(10))
    dying = CollectorProcess(fresh_redis.url, database_url, consumer="gone", crash_at="before_commit")
    assert dying.wait_died() == -signal.SIGKILL
    assert r.xpending(keyschema.USAGE_STREAM_KEY, keyschema.USAGE_GROUP)["pending"] == 20
    collectors.append(CollectorProcess(fresh_redis.url, database_url, consumer="other", claim_idle_s=1))
    view = StoredView(database_url)
    _all_applied(view, fresh_redis, 40)
    assert view.totals() == writer.totals


def test_two_replicas_at_once_are_exact(fresh_redis: RedisServer, database_url: str,
                                        collectors: list[CollectorProcess]) -> None:
    writer = Writer(sources=10, clients=8, start_ms=RECENT_MS)  # few clients: both replicas upsert the same rows
    r = fresh_redis.client()
    for name in ("a", "b"):
        collectors.append(CollectorProcess(fresh_redis.url, database_url, consumer=name, batch=5))
    for _ in range(6):
        xadd_sync(r, writer.windows(5))
    view = StoredView(database_url)
    _all_applied(view, fresh_redis, 300)
    assert view.totals() == writer.totals
    per_replica = [c.metric("sluice_analytics_windows_applied_total") for c in collectors]
    assert sum(per_replica) == 300
    assert all(c.metric("sluice_analytics_db_errors_total") == 0 for c in collectors)


def test_a_redis_restart_is_survived(fresh_redis: RedisServer, database_url: str,
                                     collectors: list[CollectorProcess]) -> None:
    """Redis restarted without persistence: the stream and the group are gone; the collector
    makes the group again (from the stream's start, so windows written before it did count) and
    applies what is written afterwards."""
    writer = Writer(sources=3, start_ms=RECENT_MS)
    collectors.append(CollectorProcess(fresh_redis.url, database_url))
    xadd_sync(fresh_redis.client(), writer.windows(4))
    view = StoredView(database_url)
    _all_applied(view, fresh_redis, 12)
    fresh_redis.restart()
    xadd_sync(fresh_redis.client(), writer.windows(4))
    _all_applied(view, fresh_redis, 24)
    assert view.totals() == writer.totals


def test_postgresql_stopped_and_started_loses_nothing(fresh_redis: RedisServer, fresh_postgres: PostgresServer,
                                                      collectors: list[CollectorProcess]) -> None:
    """Batches fail while PostgreSQL is down (counted as database errors); their entries stay
    pending and are applied once it is back: exact, no loss to count."""
    url = fresh_postgres.url()
    writer = Writer(sources=4, start_ms=RECENT_MS)
    collectors.append(c := CollectorProcess(fresh_redis.url, url))
    r = fresh_redis.client()
    xadd_sync(r, writer.windows(5))
    view = StoredView(url)
    _all_applied(view, fresh_redis, 20)
    fresh_postgres.stop()
    xadd_sync(r, writer.windows(5))
    poll(lambda: c.metric("sluice_analytics_db_errors_total") > 0, "a failed batch", diagnose=c.log_tail)
    poll(lambda: c.proc.poll() is None and http_get(f"http://127.0.0.1:{c.port}/healthz")[0] == 503,
         "/healthz to say so")
    fresh_postgres.start()
    _all_applied(view, fresh_redis, 40)
    assert view.totals() == writer.totals
    assert c.metric("sluice_analytics_windows_stale_total") == 0
    poll(lambda: http_get(f"http://127.0.0.1:{c.port}/healthz")[0] == 200, "/healthz to recover")


def test_a_redis_cluster_stream_is_stored_exactly(redis_cluster: RedisClusterProcs, tmp_path: Path,
                                                  collectors: list[CollectorProcess]) -> None:
    """On a 3-master Cluster (the stream and the rejected stream share a hash tag, one slot)."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    ns = f"cl{uuid.uuid4().hex[:8]}"  # the session's cluster is shared: only this namespace counts
    writer = Writer(namespace=ns, sources=4, start_ms=RECENT_MS)
    r = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    xadd_sync(r, writer.windows(5))
    bad_id = r.xadd(keyschema.USAGE_STREAM_KEY, {"v": "1", "w": "[]"})
    collectors.append(c := CollectorProcess(redis_cluster.url, url, consumer=f"c-{ns}"))
    xadd_sync(r, writer.windows(5))
    view = StoredView(url)
    poll(lambda: {k: v for k, v in view.totals().items() if k[0] == ns} == writer.totals,
         "the cluster's windows stored", timeout=60, diagnose=c.log_tail)
    poll(lambda: any(f[b"id"] == bad_id for _, f in r.xrange(keyschema.USAGE_REJECTED_KEY)),
         "the bad entry set aside")
    r.close()


def _xlen(redis: RedisServer) -> int:
    return int(redis.client().xlen(keyschema.USAGE_STREAM_KEY))


def test_the_stream_keeps_only_what_is_unconsumed(fresh_redis: RedisServer, tmp_path: Path,
                                                  collectors: list[CollectorProcess]) -> None:
    """XACK deletes nothing: the collector trims what it applied, so the stream (in the buckets'
    Redis) does not sit at --usage-stream-maxlen with windows already stored."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"  # the trim is the stream's; one store is enough
    writer = Writer(sources=6, start_ms=RECENT_MS)
    r = fresh_redis.client()
    collectors.append(c := CollectorProcess(fresh_redis.url, url))
    for _ in range(4):
        xadd_sync(r, writer.windows(5))
    view = StoredView(url)
    _all_applied(view, fresh_redis, 6 * 5 * 4)
    poll(lambda: _xlen(fresh_redis) == 0, "the applied windows trimmed", diagnose=lambda: f"XLEN {_xlen(fresh_redis)}")
    poll(lambda: c.metric("sluice_analytics_stream_trimmed_total") == 120, "the trim counted")
    c.stop()
    xadd_sync(r, writer.windows(3))  # the collector is down: these wait in the stream
    assert _xlen(fresh_redis) == 18
    collectors.append(CollectorProcess(fresh_redis.url, url))
    _all_applied(view, fresh_redis, 138)
    poll(lambda: _xlen(fresh_redis) == 0, "the windows written while down trimmed once applied")
    assert view.totals() == writer.totals


def test_a_dead_replicas_pending_entries_are_not_trimmed_before_they_are_applied(
        fresh_redis: RedisServer, tmp_path: Path, collectors: list[CollectorProcess]) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    writer = Writer(sources=4, start_ms=RECENT_MS)
    r = fresh_redis.client()
    xadd_sync(r, writer.windows(10))  # 40 windows: batches of 20
    dying = CollectorProcess(fresh_redis.url, url, consumer="gone", crash_at="before_commit:2")
    assert dying.wait_died() == -signal.SIGKILL  # batch 1 applied (and trimmed), batch 2 held
    assert r.xpending(keyschema.USAGE_STREAM_KEY, keyschema.USAGE_GROUP)["pending"] == 20
    xadd_sync(r, writer.windows(5))  # 20 more
    view = StoredView(url)
    collectors.append(c := CollectorProcess(fresh_redis.url, url, consumer="live", claim_idle_s=3600))
    poll(lambda: view.applied() == 40, "the new windows applied by the live replica")
    poll(lambda: c.metric("sluice_analytics_windows_applied_total") == 20, "and acknowledged")
    # The dead replica's 20 are the oldest the group needs: they and everything after stay.
    poll(lambda: _xlen(fresh_redis) <= 40, "the first batch trimmed",
         diagnose=lambda: f"XLEN {_xlen(fresh_redis)}")
    assert _xlen(fresh_redis) == 40
    pending = r.xpending_range(keyschema.USAGE_STREAM_KEY, keyschema.USAGE_GROUP, "-", "+", 100)
    assert {p["consumer"] for p in pending} == {b"gone"} and len(pending) == 20
    held = {p["message_id"] for p in pending}
    assert held <= {i for i, _ in r.xrange(keyschema.USAGE_STREAM_KEY)}  # with their fields
    c.stop()
    collectors.append(CollectorProcess(fresh_redis.url, url, consumer="claimer", claim_idle_s=1))
    _all_applied(view, fresh_redis, 60)
    poll(lambda: _xlen(fresh_redis) == 0, "the claimed windows trimmed once applied")
    assert view.totals() == writer.totals


def test_another_consumer_group_is_not_robbed(fresh_redis: RedisServer, tmp_path: Path,
                                              collectors: list[CollectorProcess]) -> None:
    """Another group reading the same stream keeps what it has not read (and acknowledged)."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    key, group = keyschema.USAGE_STREAM_KEY, "an-exporter"
    writer = Writer(sources=2, start_ms=RECENT_MS)
    r = fresh_redis.client()
    r.xgroup_create(key, group, id="0", mkstream=True)
    xadd_sync(r, writer.windows(10))  # 20
    collectors.append(CollectorProcess(fresh_redis.url, url))
    view = StoredView(url)
    _all_applied(view, fresh_redis, 20)
    assert _xlen(fresh_redis) == 20  # all applied by the collector; none read by the exporter
    got = r.xreadgroup(group, "e1", {key: ">"}, count=10)[0][1]
    r.xack(key, group, *[i for i, _ in got])
    xadd_sync(r, writer.windows(2))  # 4 more: the collector applies them, then trims
    _all_applied(view, fresh_redis, 24)
    poll(lambda: _xlen(fresh_redis) == 14, "the entries both groups are done with trimmed",
         diagnose=lambda: f"XLEN {_xlen(fresh_redis)}")
    rest = r.xreadgroup(group, "e1", {key: ">"}, count=100)[0][1]
    assert len(rest) == 14 and all(fields for _, fields in rest)
    assert view.totals() == writer.totals
