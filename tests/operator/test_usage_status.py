"""``status.usage`` from the collector's summary (:mod:`sluice_operator.usage_status`) against a
real Redis: one HMGET a thousand policies per sweep and nothing else when no collector runs,
a patch only where the shown usage differs, never twice within the interval for one policy,
and the usage taken away once the summary has expired. (The real API server and collector:
tests/k8s/test_k8s_usage_status.py.)"""

from __future__ import annotations

import math
from typing import Any

from sluice_core import configstore, keyschema, usagesummary
from sluice_operator.usage_status import MAX_WRITES, UsageStatus
from support.polling import wait_for
from support.redis_servers import RedisServer

N = 2500


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served(usage: dict[str, Any] | None = None, n: int = N) -> dict[str, list[dict[str, Any]]]:
    status = {"usage": usage} if usage is not None else {}
    return {"shop": [{"metadata": {"name": f"p{i}"}, "status": dict(status)} for i in range(n)]}


def calls(server: RedisServer, command: str) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_no_collector_costs_one_read_a_thousand_policies_and_no_write(fresh_redis: RedisServer) -> None:
    writes: list[tuple[str, str, dict[str, Any]]] = []

    async def write(scope: str, name: str, status: dict[str, Any]) -> None:
        writes.append((scope, name, status))

    async with configstore.connect(fresh_redis.url) as client:
        view = UsageStatus(client, clock=Clock())
        before = sum(calls(fresh_redis, c) for c in ("hmget", "hget", "hgetall", "get", "eval", "evalsha"))
        assert await view.sweep(served(), write) == 0
        after = sum(calls(fresh_redis, c) for c in ("hmget", "hget", "hgetall", "get", "eval", "evalsha"))
        assert after - before == 1 and writes == []  # the first HMGET finds no "@": nothing more

        # With a summary: a thousand policies a command, a patch for each (zeros where no traffic),
        # the cap's worth this sweep (tests/operator/test_usage_status_rate.py: the rest later).
        await usagesummary.write(client, {"shop/p1": usagesummary.PolicySummary(10, 2, (("ip:10.0.0.1", 2),))},
                                 at=1790000000)
        before = calls(fresh_redis, "hmget")
        assert await view.sweep(served(), write) == MAX_WRITES
        assert calls(fresh_redis, "hmget") - before == math.ceil((N + 1) / usagesummary.READ_CHUNK)
        assert writes[1] == ("shop", "p1", {"usage": {"requestsLastHour": 10, "limitedLastHour": 2,
                                                      "topLimited": [{"client": "ip:10.0.0.1", "limited": 2}]}})
        assert writes[0][2] == {"usage": {"requestsLastHour": 0, "limitedLastHour": 0, "topLimited": []}}


async def test_patched_when_changed_at_most_once_an_interval(fresh_redis: RedisServer) -> None:
    writes: list[tuple[str, dict[str, Any]]] = []

    async def write(_scope: str, name: str, status: dict[str, Any]) -> None:
        writes.append((name, status))

    clock = Clock()
    async with configstore.connect(fresh_redis.url) as client:
        view = UsageStatus(client, min_interval_s=60.0, clock=clock)
        summary = usagesummary.PolicySummary(10, 2, ())
        await usagesummary.write(client, {"shop/p0": summary}, at=1)
        assert await view.sweep(served(n=1), write) == 1
        shown = writes[-1][1]["usage"]
        # What the status now shows (the index's body after the watch event): no patch again.
        assert await view.sweep(served(shown, n=1), write) == 0
        await usagesummary.write(client, {"shop/p0": usagesummary.PolicySummary(11, 2, ())}, at=2)
        clock.now += 59
        assert await view.sweep(served(shown, n=1), write) == 0  # changed, but within the interval
        clock.now += 1
        assert await view.sweep(served(shown, n=1), write) == 1
        assert writes[-1] == ("p0", {"usage": {"requestsLastHour": 11, "limitedLastHour": 2, "topLimited": []}})

        # The collector stopped: its summary expires (a TTL) and the usage goes, once.
        await usagesummary.write(client, {}, at=3, ttl_s=0.05)
        await wait_gone(client)
        clock.now += 60
        shown = writes[-1][1]["usage"]
        assert await view.sweep(served(shown, n=1), write) == 1 and writes[-1] == ("p0", {"usage": None})
        clock.now += 60
        assert await view.sweep(served(n=1), write) == 0


async def wait_gone(client: configstore.Client) -> None:
    async def gone() -> bool:
        return not await client.redis.exists(keyschema.USAGE_SUMMARY_KEY)

    await wait_for(gone, what="the summary expired")


async def test_a_cluster_policy_is_found_by_its_name(fresh_redis: RedisServer) -> None:
    """Usage names a ClusterRateLimitPolicy by its name alone (its sidecars' namespaces vary)."""
    writes: list[tuple[str, str, dict[str, Any]]] = []

    async def write(scope: str, name: str, status: dict[str, Any]) -> None:
        writes.append((scope, name, status))

    async with configstore.connect(fresh_redis.url) as client:
        await usagesummary.write(client, {"partners": usagesummary.PolicySummary(7, 1, (("key:acme", 1),)),
                                          "shop/partners": usagesummary.PolicySummary(99, 0, ())}, at=1)
        view = UsageStatus(client, clock=Clock())
        assert await view.sweep({"_cluster": [{"metadata": {"name": "partners"}}]}, write) == 1
    assert writes == [("_cluster", "partners", {"usage": {"requestsLastHour": 7, "limitedLastHour": 1,
                                                          "topLimited": [{"client": "key:acme", "limited": 1}]}})]
