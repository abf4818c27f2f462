"""One task for every policy, instead of a kopf timer and a daemon per policy (two tasks each,
all started at once at start-up, 0.8 MB a policy): every interval (and every
:data:`REDIS_CHECK_S` between) it checks that Redis still holds what was written, re-writing
everything only when it does not (a policy's keys only when only its key index is gone), reads the sidecars'
heartbeats and writes the status of the policies whose ``Enforced`` count changed, then (after
that, so it never delays it) of those whose usage summary visibly changed
(:mod:`sluice_operator.usage_status`); between intervals it wakes when a namespace's first key
expires.

An interval costs a handful of Redis commands, however many policies; its API writes are the
statuses whose ``Enforced`` count changed, plus at most
:data:`~sluice_operator.usage_status.MAX_WRITES` ``status.usage`` patches while a collector runs
(none when no policy's rounded usage changed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sluice_core import configstore
from sluice_core.model import CLUSTER_SCOPE

from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.memtrim import trim
from sluice_operator.reconcile import NamespaceOutcome, Reconciler
from sluice_operator.status import status_update
from sluice_operator.usage_status import UsageStatus

log = logging.getLogger("sluice.operator")
RETRY_S = 1.0  # after a failed expiry reconcile (Redis away)
REDIS_CHECK_S = 5.0
RECOUNT_COALESCE_S = 0.5  # a recount may come this much early, to share its heartbeat read
"""Between sweeps, how often Redis is checked for what it lost (:meth:`Resync.check_redis`: the
count of writes, one EXISTS per thousand documents and per thousand key indexes): after a
flush, sidecars that read grants refuse every required key until the grants are back, so the
loss is looked for sooner than at the next sweep."""


class Gate(Protocol):
    """Is this replica the active one (:class:`~sluice_operator.peering.PeeringGate`)?"""

    async def active(self) -> bool: ...


class Standalone:
    """The gate of a replica without peering: always active."""

    async def active(self) -> bool:
        return True


@dataclass
class Hooks:
    """What the resync task needs of the kopf wiring (handlers.py)."""

    served: Callable[[], Mapping[str, Sequence[Mapping[str, Any]]]]
    """scope (namespace, or ``_cluster``) -> its policies' bodies, as the indexes hold them"""
    restore: Callable[[], Awaitable[None]]
    """reconcile every scope again (Redis lost what was written)"""
    reconcile: Callable[[str], Awaitable[None]]
    """reconcile one scope and write its policies' statuses (a key expired)"""
    write_status: Callable[[str, str, dict[str, Any]], Awaitable[None]]
    """(scope, policy name, status)"""
    deleted_meanwhile: Callable[[str, str], Awaitable[None]] | None = None
    """(scope, policy name) that sidecars still enforce but kopf's index does not hold: taken
    out of Redis if the API server confirms it is gone (deleted while no operator ran)"""


class Resync:
    def __init__(self, interval_s: float, reconciler: Reconciler, heartbeats: HeartbeatView,
                 gate: Gate, hooks: Hooks, check_s: float = REDIS_CHECK_S, usage: UsageStatus | None = None) -> None:
        self.usage = usage
        self.interval_s = interval_s
        self.check_s = min(check_s, interval_s)
        self.reconciler = reconciler
        self.heartbeats = heartbeats
        self.gate = gate
        self.hooks = hooks

    async def run(self) -> None:
        next_sweep = time.monotonic() + self.interval_s
        next_check = time.monotonic() + self.check_s
        retry_at = 0.0
        while True:
            self.reconciler.changed.clear()
            try:
                if not await self.gate.active():
                    retry_at = time.monotonic() + RETRY_S  # look again then, not in a loop
                    # A paused replica reports nothing it last saw as leader: its stale gauges
                    # would keep alerts firing (or add to the leader's) after a handover.
                    self.reconciler.metrics.sidecars_behind = {}
                    self.reconciler.metrics.states.clear()
                else:
                    if time.monotonic() >= retry_at and not await self.expire():
                        retry_at = time.monotonic() + RETRY_S
                    if time.monotonic() >= next_sweep:
                        await self.sweep()
                    elif time.monotonic() >= next_check:
                        await self.check_redis()
                    await self.recount()
            except Exception:  # a bug must not end the resync of every policy: said, then retried
                log.exception("resync failed")
                retry_at = time.monotonic() + RETRY_S
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.interval_s
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.check_s
            soonest = min((times[0] for times in self.reconciler.recounts.values() if times), default=next_check)
            delay = min(next_sweep, next_check, soonest) - time.monotonic()
            first = min(self.reconciler.next_expiries().values(), default=None)
            if first is not None:
                until = max((first - dt.datetime.now(dt.UTC)).total_seconds(), retry_at - time.monotonic(), 0.0)
                delay = min(delay, until)
            try:  # a reconcile may have found an earlier expiry: then look again
                async with asyncio.timeout(max(delay, 0.0)):
                    await self.reconciler.changed.wait()
            except TimeoutError:
                pass

    async def expire(self) -> bool:
        """Reconcile the namespaces whose first key has expired; False if one failed. Only
        scopes kopf's index serves: on a replica that just became active it may not be filled
        yet (their policies' handlers reconcile them once it is)."""
        now = dt.datetime.now(dt.UTC)
        ok = True
        served = self.hooks.served()
        for scope, when in sorted(self.reconciler.next_expiries().items(), key=lambda kv: kv[1]):
            if when <= now and scope not in served:
                self.reconciler.drop_expiry(scope)
            elif when <= now:
                await self.hooks.reconcile(scope)
                latest = self.reconciler.next_expiries().get(scope)
                ok = ok and not (latest is not None and latest <= now)
        return ok

    async def sweep(self) -> None:
        self.reconciler.metrics.resyncs.inc()
        trim()  # what bursts of work since the last interval freed (start-up's above all)
        await self.reconciler.memory_check.run()
        await self.check_redis()
        served = self.hooks.served()
        if not await self._read_heartbeats(served):
            return
        if self.hooks.deleted_meanwhile is not None:
            for scope, name in sorted(self.heartbeats.enforced_refs()):
                if name not in {str(b.get("metadata", {}).get("name")) for b in served.get(scope, ())}:
                    await self.hooks.deleted_meanwhile(scope, name)
        for scope in served:  # a namespace whose sidecars all read grants now: keys leave its document
            if self.reconciler.embedding_changes(scope):
                await self.hooks.reconcile(scope)
        behind: dict[str, set[str]] = {}
        for scope, bodies in served.items():
            outcome = self.reconciler.latest(scope)
            if outcome is not None and outcome.programmed and outcome.version:
                await self._enforced(scope, bodies, outcome)
                for ns, pods in self._behind(scope, outcome).items():
                    behind.setdefault(ns, set()).update(pods)  # a pod behind on both documents: one
        self.reconciler.metrics.sidecars_behind = {ns: len(pods) for ns, pods in behind.items()}
        if self.usage is not None:  # last: a sweep's usage patches never delay its Enforced ones
            await self.usage.sweep(served, self.hooks.write_status)

    async def _read_heartbeats(self, served: Mapping[str, Any]) -> bool:
        """Refresh the heartbeats of the served namespaces; False (said) when Redis did not answer."""
        try:
            await self.heartbeats.refresh(ns for ns in served if ns != CLUSTER_SCOPE)
        except configstore.ConfigStoreError as exc:
            log.warning("cannot read heartbeats: %s", exc)
            return False
        return True

    def _behind(self, scope: str, outcome: NamespaceOutcome) -> dict[str, set[str]]:
        """The scope's sidecars that report an older version than the one written: a namespace's,
        or for the cluster document those of every namespace a cluster policy covers."""
        if scope != CLUSTER_SCOPE:
            return self.heartbeats.behind([scope], outcome.version)
        covered = {ns for r in outcome.results.values() for ns in (r.scope or [])}
        return self.heartbeats.behind(sorted(covered), outcome.version, cluster=True)

    async def recount(self) -> None:
        """Count the sidecars of the scopes that got a new config version a moment ago (see
        :attr:`Reconciler.recounts`), so that ``Enforced`` follows a policy edit in about a
        second instead of at the next sweep."""
        now, recounts = time.monotonic(), self.reconciler.recounts
        # Scopes due within RECOUNT_COALESCE_S go along: policies written in a burst (an apply of
        # many, a restore) share one heartbeat read instead of one each.
        due = [scope for scope, times in recounts.items() if times and times[0] <= now + RECOUNT_COALESCE_S]
        if not due:
            return
        for scope in due:
            recounts[scope].pop(0)
            if not recounts[scope]:
                del recounts[scope]
        served = self.hooks.served()
        if not await self._read_heartbeats(served):
            return
        for scope in due:
            outcome = self.reconciler.latest(scope)
            if scope in served and outcome is not None and outcome.programmed and outcome.version:
                await self._enforced(scope, served[scope], outcome)

    async def check_redis(self) -> None:
        """Put back what Redis lost: everything when the count of writes says so (every
        document, every policy's grants judged in full), only the scopes whose key index is gone
        otherwise. Redis not answering is no loss: checked again at the next interval."""
        r = self.reconciler
        state = await r.intact()
        if state is None:
            return
        if not state:
            log.warning("Redis lost config or key grants this operator wrote (flushed, restarted empty, "
                        "restored from an older snapshot, failed over with a lag) or another replica "
                        "wrote too: reconciling every namespace again")
            r.metrics.restores.inc()
            if await r.start_counting():
                await self.hooks.restore()
            return
        for scope in await r.lost_grants() or []:
            log.warning("Redis lost the key grants of a policy of %s (its key index is gone): "
                        "writing its keys again", scope)
            r.metrics.restores.inc()
            r.keys.unsync(scope)
            await self.hooks.reconcile(scope)

    async def _enforced(self, scope: str, bodies: Sequence[Mapping[str, Any]], outcome: NamespaceOutcome) -> None:
        """Write the status of the scope's policies whose count of enforcing sidecars changed."""
        for body in bodies:
            meta = body.get("metadata", {})
            name = str(meta.get("name"))
            result = outcome.results.get(name)
            if result is None or meta.get("deletionTimestamp"):
                continue
            if scope == CLUSTER_SCOPE:
                count = self.heartbeats.count(result.scope or [], name, outcome.version, cluster=True)
            else:
                count = self.heartbeats.count([scope], name, outcome.version)
            status = status_update(body, result, outcome, count)
            if status is not None:
                await self.hooks.write_status(scope, name, status)
