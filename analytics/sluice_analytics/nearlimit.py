"""Near-limit alerts (a policy's ``spec.alerts``): which clients have used a share of their
tier's allowance for the current calendar hour or day, detected from the per-minute rollup once
an interval, each sent once per (policy, alert, client, period), at most
:data:`MAX_PER_PERIOD` clients per (policy, alert, period).

The allowance of a tier for a period is its rate times the period: ``requests`` per ``period``
scaled to 1 h or 24 h (the burst is not counted: it is a one-off head start, not a budget). What
a client used is the tokens it took in the period (allowed requests, each its rule's cost),
summed over every sidecar and, for a cluster policy, every namespace. A key with a limit of its
own is measured against its tier's allowance (the rollup knows the tier, not the key's grant).

The policies come from the config documents in Redis (what the sidecars enforce), read for the
namespaces that had traffic in the day: no Kubernetes access is needed, and a standalone
install (``sluice apply``) gets its alerts too.

Sending is at most once: the row recording the alert commits before it is delivered, so two
replicas never both send it, and a collector that dies in between loses that one alert
(delivery itself retries: :mod:`sluice_analytics.webhooks`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sluice_core import configstore
from sluice_core.configdoc import NamespaceConfig
from sluice_core.errors import PolicyErrors
from sluice_core.model import CLUSTER_SCOPE, Alert, CompiledPolicy, Tier
from sluice_core.usage import OTHER
from sluice_core.usagesummary import display_client
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics.schema import usage_alerts, usage_minute
from sluice_analytics.store import insert_for

log = logging.getLogger("sluice.analytics")
KEEP_SENT_S = 2 * 86400  # a sent alert is remembered while its period (a day at most) can recur
MAX_PER_PERIOD = 100  # clients alerted per (policy, alert, period) at most; the rest are counted


@dataclass(frozen=True)
class Crossing:
    """A client past an alert's share of its tier's allowance in the current period."""

    policy: str  # the usage rows' policy ref: ``namespace/name``, or a cluster policy's name
    namespace: str  # the policy's namespace; ``_cluster`` for a cluster policy
    name: str  # the policy's name
    alert: Alert
    client: str
    tier: str
    used: int  # tokens taken in the period so far
    allowance: int  # tokens the tier allows in the period
    period_start: int  # unix seconds

    def body(self) -> dict[str, object]:
        """The webhook's JSON body (the same facts as the Event's message)."""
        return {"kind": "SluiceNearLimit", "alert": self.alert.name, "namespace": self.namespace,
                "policy": self.name, "client": self.client, "tier": self.tier,
                "period": self.alert.period.value, "periodStart": self.period_start,
                "used": self.used, "allowance": self.allowance, "percent": self.alert.percent,
                "usedPercent": round(100 * self.used / self.allowance, 1) if self.allowance else None}

    def message(self) -> str:
        share = f"{100 * self.used / self.allowance:.0f}%" if self.allowance else "all"
        # The client id is the attacker's to choose (a header hash, an address, a key file's id):
        # shown as the policy status shows it, bounded and in a safe alphabet.
        return (f"client {display_client(self.client)} (tier {self.tier}) used {self.used} of {self.allowance} tokens "
                f"({share}) of its {self.alert.period.value}ly allowance in the {self.alert.period.value} "
                f"from {_utc(self.period_start)} (alert {self.alert.name}: {self.alert.percent}%)")


def allowance(tier: Tier, period_s: int) -> int:
    """Tokens ``tier`` allows in ``period_s`` seconds: its rate times the period."""
    return int(tier.limit.requests * period_s * 1_000_000 // tier.limit.period_us)


def threshold(tier: Tier, alert: Alert) -> int:
    """The tokens used at which ``alert`` fires for a client of ``tier`` (at least 1)."""
    return max(1, math.ceil(allowance(tier, alert.period.seconds) * alert.percent / 100))


def usage_ref(policy: CompiledPolicy) -> str:
    """The policy as usage rows name it."""
    return policy.name if policy.cluster_scoped else policy.ref


async def active_policies(engine: AsyncEngine, since_s: int) -> list[tuple[str, str]]:
    """(namespace, policy) pairs of the usage rows since ``since_s`` (the minute table)."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(usage_minute.c.namespace, usage_minute.c.policy)
                                  .where(usage_minute.c.ts >= since_s).distinct())
        return [(r[0], r[1]) for r in rows]


async def policies_with_alerts(client: configstore.Client, active: Iterable[tuple[str, str]]) -> list[CompiledPolicy]:
    """The policies with alerts among those with traffic, as their config documents say: the
    namespaces' documents for ``namespace/name`` refs, the cluster document for bare names."""
    docs: dict[str, NamespaceConfig | None] = {}
    wanted: set[str] = set()
    for namespace, ref in active:
        if not ref:
            continue
        scope = namespace if "/" in ref else CLUSTER_SCOPE
        wanted.add(ref)
        if scope not in docs:
            try:
                docs[scope] = await configstore.read(client, scope)
            except PolicyErrors as exc:  # one unreadable document must not stop the others' alerts
                log.warning("near-limit alerts: the config of %s cannot be read, skipped: %s", scope, exc)
                docs[scope] = None
    out = []
    for doc in docs.values():
        for p in doc.policies if doc else ():
            if p.alerts and usage_ref(p) in wanted:
                out.append(p)
    return out


async def crossings(engine: AsyncEngine, policy: CompiledPolicy, now_s: float) -> list[Crossing]:
    """Every (alert, client, tier) of ``policy`` past its threshold in the current period."""
    ref = usage_ref(policy)
    found = []
    async with engine.connect() as conn:
        for alert in policy.alerts:
            start = int(now_s) - int(now_s) % alert.period.seconds
            for tier in policy.tiers.values():
                if alert.tiers is not None and tier.name not in alert.tiers:
                    continue
                used = func.sum(usage_minute.c.tokens)
                q = (select(usage_minute.c.client, used)
                     .where(usage_minute.c.ts >= start, usage_minute.c.policy == ref,
                            usage_minute.c.tier == tier.name, usage_minute.c.client != OTHER)
                     .group_by(usage_minute.c.client).having(used >= threshold(tier, alert)))
                if not policy.cluster_scoped:  # the (namespace, ts) index
                    q = q.where(usage_minute.c.namespace == policy.namespace)
                for client, total in await conn.execute(q):
                    found.append(Crossing(ref, policy.namespace, policy.name, alert, client, tier.name,
                                          int(total), allowance(tier, alert.period.seconds), start))
    return found


@dataclass
class Recorded:
    new: list[Crossing]  # recorded now, to send
    suppressed: int  # past the cap of their (policy, alert, period): recorded by no one, not sent


async def record(engine: AsyncEngine, found: Sequence[Crossing], now_s: float,
                 max_per_period: int = MAX_PER_PERIOD) -> Recorded:
    """Record ``found`` as sent, at most ``max_per_period`` clients per (policy, alert, period)
    (an alert at 1 % of an IP-identified tier would otherwise be one Event and one POST per
    client an hour); the ones no replica recorded before are returned to send. The cap is
    counted in the database, so it holds across replicas but for a race at its edge."""
    out = Recorded([], 0)
    if not found:
        return out
    groups: dict[tuple[str, str, int], list[Crossing]] = {}
    for c in sorted(found, key=lambda c: (c.policy, c.alert.name, c.period_start, c.client)):
        groups.setdefault((c.policy, c.alert.name, c.period_start), []).append(c)
    async with engine.begin() as conn:
        for (policy, alert, start), group in groups.items():
            t = usage_alerts.c
            sent = (await conn.execute(select(func.count()).select_from(usage_alerts).where(
                t.policy == policy, t.alert == alert, t.period_start == start))).scalar_one()
            for c in group:
                if sent >= max_per_period:
                    out.suppressed += 1
                    continue
                stmt = insert_for(conn, usage_alerts).values(
                    policy=c.policy, alert=c.alert.name, client=c.client, period_start=c.period_start,
                    tier=c.tier, used=c.used, allowance=c.allowance, sent_at=int(now_s),
                ).on_conflict_do_nothing().returning(usage_alerts.c.client)
                if (await conn.execute(stmt)).first() is not None:
                    out.new.append(c)
                    sent += 1
        await conn.execute(delete(usage_alerts).where(usage_alerts.c.period_start < int(now_s) - KEEP_SENT_S))
    return out


Deliver = Callable[[Crossing], Awaitable[None]]


class NearLimitAlerts:
    """One detection pass: the policies with alerts and traffic today, their crossings, the
    new ones recorded and handed to every ``deliver`` (an Event, a webhook), which must not
    raise or block (they queue their own work)."""

    def __init__(self, engine: AsyncEngine, redis: configstore.Client, deliver: Sequence[Deliver],
                 *, max_per_period: int = MAX_PER_PERIOD) -> None:
        self.engine, self.redis, self.deliver = engine, redis, list(deliver)
        self.max_per_period = max_per_period
        self.suppressed = 0  # crossings past the cap, all passes

    async def run_once(self, now_s: float) -> list[Crossing]:
        day = int(now_s) - int(now_s) % 86400
        policies = await policies_with_alerts(self.redis, await active_policies(self.engine, day))
        found: list[Crossing] = []
        for policy in policies:
            found += await crossings(self.engine, policy, now_s)
        recorded = await record(self.engine, found, now_s, self.max_per_period)
        if recorded.suppressed:
            self.suppressed += recorded.suppressed
            log.warning("near-limit alerts: %d crossing(s) past %d clients per alert and period not sent",
                        recorded.suppressed, self.max_per_period)
        for c in recorded.new:
            log.info("near-limit alert %s on %s: %s", c.alert.name, c.policy, c.message())
            for deliver in self.deliver:
                try:
                    await deliver(c)
                except Exception:  # recorded already: one deliverer's bug must not lose the others
                    log.exception("near-limit alert %s on %s: a delivery failed", c.alert.name, c.policy)
        return recorded.new


def _utc(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
