"""``status.usage`` of each served policy: its last hour as ``sluice analytics`` summarised it
(:mod:`sluice_core.usagesummary`), for ``kubectl get rlp``.

Once per resync sweep, after the sweep's ``Enforced`` work: one HMGET a thousand policies (the
summary's ``@`` field with them, so "no collector" costs that one command and nothing else), then
a status patch for a policy only where what it shows differs, never twice within
``min_interval_s`` for one policy, and at most :data:`MAX_WRITES` patches a sweep, the least
recently patched policies first (so none starves). With no summary in Redis (no collector runs,
or it stopped and its summary expired), a policy that still shows usage has it removed, once; the
others are left alone. A policy absent from a summary that says it is ``truncated`` (more
policies had traffic than it holds) is left alone too: its usage is unknown, not zero.

The counts are shown to two significant figures (:func:`shown_count`: 18,234 -> 18,000; below
100 exact), so a busy policy's status changes when its traffic visibly does, or its most limited
clients do, not every minute: a patch is an etcd write and a watch event to every watcher of
policies, and the traffic of a thousand policies must not make a thousand of them a minute.

The status (README, "Status of a policy")::

    usage:
      requestsLastHour: 1200
      limitedLastHour: 31
      topLimited: [{client: "ip:203.0.113.7", limited: 30}, ...]   # at most 3

Client ids are bounded and reduced to a safe alphabet by the core as they are read
(:func:`sluice_core.usagesummary.display_client`), whatever Redis holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sluice_core import configstore, usagesummary
from sluice_core.model import CLUSTER_SCOPE

log = logging.getLogger("sluice.operator")
WriteStatus = Callable[[str, str, dict[str, Any]], Awaitable[None]]
SHOWN_DIGITS = 2
MAX_WRITES = 100
"""The most ``status.usage`` patches one sweep makes (at 10-20 ms a patch, 1-2 s of the resync
interval): with the default interval of 30 s, at most 200 a minute whatever the number of
policies; beyond that, a policy's change is shown a sweep or more later."""
Key = tuple[str, str]  # (scope, policy name)


def usage_ref(scope: str, name: str) -> str:
    """A policy as usage names it: ``namespace/name``, a cluster policy by its name."""
    return name if scope == CLUSTER_SCOPE else f"{scope}/{name}"


def shown_count(n: int) -> int:
    """``n`` to :data:`SHOWN_DIGITS` significant figures, half up (1,249 -> 1,200; 1,250 ->
    1,300; 99 -> 99): what the status shows, so that it changes only when the traffic visibly does."""
    if n < 10**SHOWN_DIGITS:
        return n
    step: int = 10 ** (len(str(n)) - SHOWN_DIGITS)
    return (n + step // 2) // step * step


def status_usage(summary: usagesummary.PolicySummary) -> dict[str, Any]:
    return {"requestsLastHour": shown_count(summary.requests), "limitedLastHour": shown_count(summary.limited),
            "topLimited": [{"client": c, "limited": shown_count(n)} for c, n in summary.top[:usagesummary.TOP]]}


class UsageStatus:
    def __init__(self, redis_client: configstore.Client, min_interval_s: float = usagesummary.INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, max_writes: int = MAX_WRITES) -> None:
        self.redis = redis_client
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.max_writes = max_writes
        self._written: dict[Key, float] = {}  # (scope, name) -> when its usage was last patched

    async def sweep(self, served: Mapping[str, Sequence[Mapping[str, Any]]], write: WriteStatus) -> int:
        """Patch the ``status.usage`` of the served policies where it changed; how many.
        ``served``: scope -> its policies' bodies (as kopf's indexes hold them, status included)."""
        policies = {(scope, str(body.get("metadata", {}).get("name"))): body
                    for scope, bodies in served.items() for body in bodies
                    if not body.get("metadata", {}).get("deletionTimestamp")}
        self._written = {k: v for k, v in self._written.items() if k in policies}
        if not policies:
            return 0
        refs = [usage_ref(scope, name) for scope, name in policies]
        try:
            summary = await usagesummary.read(self.redis, refs)
        except configstore.ConfigStoreError as exc:
            log.debug("usage summary not read: %s", exc)
            return 0
        now = self.clock()
        due: list[tuple[Key, dict[str, Any] | None]] = []
        for key, body in policies.items():
            last = self._written.get(key)
            if last is not None and now - last < self.min_interval_s:
                continue
            wanted = _wanted(summary, usage_ref(*key))
            if wanted is not _UNKNOWN and (body.get("status") or {}).get("usage") != wanted:
                due.append((key, wanted))
        due.sort(key=lambda d: (self._written.get(d[0], -math.inf), d[0]))  # least recently patched first
        for key, wanted in due[:self.max_writes]:
            self._written[key] = now
            await write(*key, {"usage": wanted})  # None: a merge patch removes it
        return min(len(due), self.max_writes)


_UNKNOWN: dict[str, Any] = {}  # a truncated summary's absent policy: leave its status as it is


def _wanted(summary: usagesummary.Summary | None, ref: str) -> dict[str, Any] | None:
    """What ``status.usage`` should show: None (removed) without a summary."""
    if summary is None:
        return None
    found = summary.policies.get(ref)
    if found is None:
        return _UNKNOWN if summary.truncated else status_usage(usagesummary.PolicySummary())
    return status_usage(found)
