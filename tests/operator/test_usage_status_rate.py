"""How many ``status.usage`` patches the operator makes, through the resync's real sweep (real
Redis, a real Reconciler and heartbeat view; the API server's part is the hook that counts the
patches and updates the bodies the way the watch would): 2,000 busy policies whose counts move
a little every minute cost at most :data:`~sluice_operator.usage_status.MAX_WRITES` patches a
sweep, counts that all change visibly are written round-robin (none starves), the usage patches
come after the sweep's ``Enforced`` ones, and a truncated summary leaves the policies it does
not hold alone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sluice_core import configstore, usagesummary
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.reconcile import Reconciler
from sluice_operator.resync import Hooks, Resync, Standalone
from sluice_operator.usage_status import MAX_WRITES, UsageStatus, shown_count
from support.redis_servers import RedisServer

N = 2000
SWEEP_S = 30.0  # the default resync interval
BUSY = "bulk"  # a namespace of N policies the reconciler has no outcome for: usage patches only


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Index:
    """kopf's index of policies as the watch keeps it: a patch shows in the next sweep's bodies."""

    def __init__(self, scopes: Mapping[str, Sequence[dict[str, Any]]]) -> None:
        self.scopes = {scope: list(bodies) for scope, bodies in scopes.items()}
        self.by_key = {(scope, b["metadata"]["name"]): b for scope, bodies in self.scopes.items() for b in bodies}
        self.writes: list[tuple[str, str, dict[str, Any]]] = []

    def served(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
        return self.scopes

    async def write(self, scope: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append((scope, name, status))
        body = self.by_key[(scope, name)]
        merged = {**body.get("status", {}), **status}
        body["status"] = {k: v for k, v in merged.items() if v is not None}

    def usage_patches(self) -> int:
        return sum(1 for _, _, status in self.writes if "usage" in status)


def busy(n: int = N) -> list[dict[str, Any]]:
    return [{"metadata": {"name": f"p{i}", "namespace": BUSY}} for i in range(n)]


async def _noop(_scope: str = "") -> None:
    return None


@asynccontextmanager
async def resync_of(url: str, index: Index, clock: Clock,
                    reconcile: Callable[[Reconciler], Any] | None = None) -> AsyncIterator[tuple[Resync, Reconciler]]:
    reconciler = Reconciler(configstore.connect(url), scope=f"test-{uuid.uuid4().hex[:8]}")
    try:
        assert await reconciler.start_counting()
        if reconcile is not None:
            await reconcile(reconciler)
        hooks = Hooks(served=index.served, restore=_noop, reconcile=_noop, write_status=index.write)
        usage = UsageStatus(reconciler.redis, clock=clock)
        yield Resync(SWEEP_S, reconciler, HeartbeatView(reconciler.redis, 60.0), Standalone(), hooks, usage=usage), reconciler
    finally:
        await reconciler.close()


async def summarise(client: configstore.Client, counts: Mapping[str, int], at: int) -> None:
    """What the collector writes each minute: every busy policy, a tenth of its requests limited."""
    await usagesummary.write(client, {f"{BUSY}/{name}": usagesummary.PolicySummary(n, n // 10, (("ip:10.0.0.1", n // 10),))
                                      for name, n in counts.items()}, at=at)


async def sweeps(resync: Resync, index: Index, clock: Clock, n: int) -> list[int]:
    """``n`` sweeps, one resync interval apart; the usage patches of each."""
    out = []
    for _ in range(n):
        before = index.usage_patches()
        await resync.sweep()
        out.append(index.usage_patches() - before)
        clock.now += SWEEP_S
    return out


def test_counts_are_shown_to_two_significant_figures() -> None:
    assert [shown_count(n) for n in (0, 7, 99, 100, 149, 150, 1249, 1250, 18_234, 995, 2**53 - 1)] == \
        [0, 7, 99, 100, 150, 150, 1200, 1300, 18_000, 1000, 9_000_000_000_000_000]


async def test_busy_policies_moving_a_little_cost_at_most_the_cap_a_sweep(fresh_redis: RedisServer) -> None:
    """2,000 policies with traffic, every count up by ~0.2 % a minute (each minute's summary):
    the first sweeps fill the statuses the cap's worth at a time; after that only a count that
    crosses a rounding step is patched, far fewer than one patch a policy a minute."""
    clock, index = Clock(), Index({BUSY: busy()})
    counts = {f"p{i}": 20_000 + 7 * i for i in range(N)}
    async with resync_of(fresh_redis.url, index, clock) as (resync, reconciler):
        await summarise(reconciler.redis, counts, at=1)
        fill = await sweeps(resync, index, clock, N // MAX_WRITES + 1)
        assert fill == [MAX_WRITES] * (N // MAX_WRITES) + [0]
        moving: list[int] = []
        for minute in range(10):
            counts = {name: n + 40 for name, n in counts.items()}
            await summarise(reconciler.redis, counts, at=2 + minute)
            moving += await sweeps(resync, index, clock, 2)  # two sweeps a summary
        assert max(moving) <= MAX_WRITES
        assert sum(moving) < N  # 10 minutes of 2,000 busy policies: fewer patches than policies
        shown = {name: b["status"]["usage"]["requestsLastHour"] for (_, name), b in index.by_key.items()}
        assert shown == {name: shown_count(n) for name, n in counts.items()}  # and all up to date


async def test_visible_changes_are_patched_round_robin(fresh_redis: RedisServer) -> None:
    """Every policy's count changes visibly every minute (more than the cap can follow): each
    sweep patches the cap's worth, the least recently patched first, so every policy is patched
    in turn and none twice before all others once."""
    clock, index = Clock(), Index({BUSY: busy()})
    async with resync_of(fresh_redis.url, index, clock) as (resync, reconciler):
        per_policy: dict[str, int] = {}
        for minute in range(N // MAX_WRITES):
            await summarise(reconciler.redis, {f"p{i}": 1000 * (minute + 1) + i for i in range(N)}, at=minute + 1)
            before = len(index.writes)
            assert await sweeps(resync, index, clock, 2) == [MAX_WRITES, MAX_WRITES]
            for _, name, _ in index.writes[before:]:
                per_policy[name] = per_policy.get(name, 0) + 1
        assert len(per_policy) == N and max(per_policy.values()) - min(per_policy.values()) <= 1


async def test_usage_patches_come_after_the_enforced_ones(fresh_redis: RedisServer) -> None:
    """A sweep writes the statuses whose Enforced count changed first: usage patches never delay them."""
    ns = f"ord-{uuid.uuid4().hex[:6]}"
    policy = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
              "metadata": {"name": "api", "namespace": ns, "generation": 1},
              "spec": {"selector": {"matchLabels": {"app": "web"}},
                       "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}
    clock, index = Clock(), Index({ns: [policy], BUSY: busy(10)})

    async def reconcile(r: Reconciler) -> None:
        out = await r.reconcile(ns, [policy], [])
        assert out.redis_error is None and out.programmed

    async with resync_of(fresh_redis.url, index, clock, reconcile) as (resync, reconciler):
        await usagesummary.write(reconciler.redis, {f"{ns}/api": usagesummary.PolicySummary(5, 1, ())}, at=1)
        await resync.sweep()
    kinds = ["usage" if "usage" in status else "enforced" for _, _, status in index.writes]
    assert kinds[0] == "enforced" and kinds[1:] == ["usage"] * 11, kinds


async def test_a_truncated_summary_leaves_the_policies_it_lacks_alone(fresh_redis: RedisServer) -> None:
    """More policies had traffic than a summary holds (MAX_POLICIES, the busiest): one it lacks
    is unknown, not idle, so its status keeps what it shows; with a complete summary, absent
    means no traffic (zeros)."""
    clock = Clock()
    quiet = {"metadata": {"name": "quiet", "namespace": BUSY},
             "status": {"usage": {"requestsLastHour": 12, "limitedLastHour": 0, "topLimited": []}}}
    index = Index({BUSY: [quiet]})
    async with resync_of(fresh_redis.url, index, clock) as (resync, reconciler):
        many = {f"other/p{i}": usagesummary.PolicySummary(100 + i, 0, ()) for i in range(usagesummary.MAX_POLICIES)}
        many[f"{BUSY}/quiet"] = usagesummary.PolicySummary(12, 0, ())  # the least busy: left out
        assert await usagesummary.write(reconciler.redis, many, at=1) == usagesummary.MAX_POLICIES
        summary = await usagesummary.read(reconciler.redis, [f"{BUSY}/quiet", "other/p0"])
        assert summary is not None and summary.truncated and list(summary.policies) == ["other/p0"]
        await resync.sweep()
        assert index.writes == []
        del many[f"{BUSY}/quiet"]
        await usagesummary.write(reconciler.redis, many, at=2)  # complete: absent is idle
        summary = await usagesummary.read(reconciler.redis, [f"{BUSY}/quiet"])
        assert summary is not None and not summary.truncated
        await resync.sweep()
        assert index.writes == [(BUSY, "quiet", {"usage": {"requestsLastHour": 0, "limitedLastHour": 0,
                                                           "topLimited": []}})]
