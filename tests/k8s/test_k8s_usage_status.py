"""``kubectl get rlp`` shows the last hour's usage: usage windows (as sidecars write them) go
through the real collector (stream -> SQLite -> summary in Redis), the operator (kopf, against the
real API server) patches ``status.usage``, and the printer columns show it. Nothing happens while
no collector runs, and the usage goes when the collector's summary expires. Client ids chosen by
an attacker reach ``kubectl`` bounded and harmless."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from sluice_analytics.collector import Collector
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.settings import AnalyticsSettings
from sluice_analytics.stream import UsageStream
from sluice_core import configstore, usagesummary
from sluice_core.usage import UsageRow, UsageWindow
from sqlalchemy.ext.asyncio import AsyncEngine
from support.control_plane import ControlPlane, table
from support.crds import apply_crds
from support.operator_thread import Operator, running_operator
from support.polling import poll
from support.redis_servers import RedisServer
from support.sluice_objects import programmed, served_namespace
from support.usage_windows import xadd

pytestmark = pytest.mark.k8s
PREFIX = "sluice-us"
HOSTILE = "key:$(reboot);`id`|<b>'\"\\" + "x" * 200  # a keys-file id: any printable ASCII


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    return apply_crds(control_plane)


@pytest.fixture
def operator(k8s: ControlPlane, fresh_redis: RedisServer) -> Iterator[Operator]:
    # Sweeps every 0.5 s and no wait between a policy's usage writes: the test sees each step at
    # once (the interval itself: tests/operator/test_usage_status.py).
    with running_operator(k8s, fresh_redis, f"{PREFIX}-*", resync_interval_s=0.5, usage_status_min_s=0.0) as op:
        yield op


def resyncs(op: Operator) -> float:
    return sum(s.value for m in op.metrics.registry.collect()
               if m.name == "sluice_operator_resyncs" for s in m.samples if s.name.endswith("_total"))


def policy(ns: str) -> str:
    return json.dumps({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                       "metadata": {"name": "api", "namespace": ns},
                       "spec": {"selector": {"matchLabels": {"app": "web"}},
                                "tiers": [{"name": "free", "requests": 10, "period": "1m"}]}})


def window(ns: str, seq: int, rows: list[tuple[str, str, int]]) -> UsageWindow:
    now = int(time.time() * 1000)
    return UsageWindow("web-0/1", seq, ns, now - 20_000, now - 10_000,
                       [UsageRow(f"{ns}/api", c, "free", "/x", o, "none" if o == "limited" else "2xx", n, n)
                        for c, o, n in rows])


async def test_kubectl_shows_the_last_hours_usage(k8s: ControlPlane, operator: Operator, fresh_redis: RedisServer,
                                                  engine: AsyncEngine) -> None:
    op = operator
    with served_namespace(k8s, PREFIX) as ns:
        k8s.kubectl("apply", "-f", "-", input=policy(ns))
        poll(lambda: programmed(k8s, "rlp", "api", ns), "Programmed")

        # No collector: several sweeps write nothing, and no usage is shown.
        start = resyncs(op)
        poll(lambda: resyncs(op) >= start + 2, "two sweeps")
        version = op.rlp(ns, "api")["metadata"]["resourceVersion"]  # type: ignore[index]
        start = resyncs(op)
        poll(lambda: resyncs(op) >= start + 3, "three more sweeps")
        live = op.rlp(ns, "api") or {}
        assert live["metadata"]["resourceVersion"] == version and "usage" not in live["status"]
        row = table(k8s.kubectl("get", "rlp", "-n", ns).stdout)[0]
        assert (row["REQUESTS/1H"], row["LIMITED/1H"]) == ("", "")

        # The collector applies two windows and writes its summary.
        settings = AnalyticsSettings(redis=fresh_redis.url, consumer="c1", block_ms=100)
        async with configstore.connect(fresh_redis.url) as client:
            collector = Collector(settings, engine, UsageStream(client, "c1", block_ms=100, claim_idle_s=60),
                                  AnalyticsMetrics())
            hostile = "".join(c for c in HOSTILE if c.isprintable())
            await xadd(client.redis, [window(ns, 0, [("ip:10.0.0.1", "allowed", 90), ("ip:10.0.0.1", "limited", 4),
                                                     (hostile, "limited", 6), ("header:abcd", "limited", 1),
                                                     ("ip:10.0.0.9", "limited", 2)])])
            while await collector.step():
                pass
            assert await collector.summarise_once() == 1

            def shown() -> dict[str, str] | None:
                rows = table(k8s.kubectl("get", "rlp", "-n", ns, "-o", "wide").stdout)
                return rows[0] if rows and rows[0]["REQUESTS/1H"] else None

            row = poll(shown, "usage in kubectl get rlp")
            assert (row["REQUESTS/1H"], row["LIMITED/1H"]) == ("100", "13")  # 103: two significant figures
            usage = (op.rlp(ns, "api") or {})["status"]["usage"]
            clients = [c["client"] for c in usage["topLimited"]]
            assert [c["limited"] for c in usage["topLimited"]] == [6, 4, 2]
            assert clients[1:] == ["ip:10.0.0.1", "ip:10.0.0.9"]
            assert clients[0].startswith("key:_(reboot)__id___b_") and len(clients[0]) == usagesummary.MAX_CLIENT
            assert not set(clients[0]) - usagesummary.CLIENT_CHARS
            assert row["MOST-LIMITED"] == clients[0]  # -o wide

            # The collector stops: its summary expires (shortened here), and the usage goes.
            await usagesummary.write(client, {}, at=int(time.time()), ttl_s=0.2)
            poll(lambda: "usage" not in ((op.rlp(ns, "api") or {}).get("status") or {}), "usage removed")
        k8s.kubectl("delete", "rlp", "api", "-n", ns, "--timeout=30s")

