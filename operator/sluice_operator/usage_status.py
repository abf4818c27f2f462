"""``status.usage`` of each served policy: its last hour as ``sluice analytics`` summarised it
(:mod:`sluice_core.usagesummary`), for ``kubectl get rlp``.

Once per resync sweep: one HMGET a thousand policies (the summary's ``@`` field with them, so
"no collector" costs that one command and nothing else), then a status patch for a policy only
where what it shows differs, and never twice within ``min_interval_s`` for one policy. With no
summary in Redis (no collector runs, or it stopped and its summary expired), a policy that still
shows usage has it removed, once; the others are left alone.

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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sluice_core import configstore, usagesummary
from sluice_core.model import CLUSTER_SCOPE

log = logging.getLogger("sluice.operator")
WriteStatus = Callable[[str, str, dict[str, Any]], Awaitable[None]]


def usage_ref(scope: str, name: str) -> str:
    """A policy as usage names it: ``namespace/name``, a cluster policy by its name."""
    return name if scope == CLUSTER_SCOPE else f"{scope}/{name}"


def status_usage(summary: usagesummary.PolicySummary) -> dict[str, Any]:
    return {"requestsLastHour": summary.requests, "limitedLastHour": summary.limited,
            "topLimited": [{"client": c, "limited": n} for c, n in summary.top[:usagesummary.TOP]]}


class UsageStatus:
    def __init__(self, redis_client: configstore.Client, min_interval_s: float = usagesummary.INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis_client
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._written: dict[tuple[str, str], float] = {}  # (scope, name) -> when its usage was last patched

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
        now, writes = self.clock(), 0
        for (scope, name), body in policies.items():
            shown = (body.get("status") or {}).get("usage")
            if summary is None:
                wanted = None
            else:
                found = summary.policies.get(usage_ref(scope, name), usagesummary.PolicySummary())
                wanted = status_usage(found)
            last = self._written.get((scope, name))
            if shown == wanted or (last is not None and now - last < self.min_interval_s):
                continue
            self._written[(scope, name)] = now
            await write(scope, name, {"usage": wanted})  # None: a merge patch removes it
            writes += 1
        return writes
