"""Is the Redis the operator writes to configured the way Sluice needs it?

Every bucket key has a TTL (it lives until its bucket is full again) and the config documents
(``sluice:cfg:*``) have none. So under ``maxmemory``:

- a ``volatile-*`` policy evicts only keys with a TTL: buckets (and sidecar heartbeats), never a
  config document; an evicted bucket is a client starting with a full bucket. Recommended:
  ``volatile-ttl``, which evicts the bucket nearest its expiry, i.e. the most refilled one, whose
  client loses the least;
- ``noeviction`` refuses every write once Redis is full: every decision fails and each policy's
  ``failureMode`` answers for all clients (identity churn can get it there);
- ``allkeys-*`` may evict a config document: sidecars keep their last good config, but a sidecar
  that starts then has none until the operator re-pushes it (up to one resync interval).

Read at start-up and then at most once per resync interval; a finding is logged (WARNING) when it
changes, not at every read, and kept in ``sluice_operator_redis_eviction_unsafe``.
"""

from __future__ import annotations

import logging
import time

from sluice_core import configstore

from sluice_operator.metrics import OperatorMetrics

log = logging.getLogger("sluice.operator")
RECOMMENDED = "volatile-ttl"


def problem(maxmemory: int, policy: str) -> str | None:
    """What goes wrong with this setting, or None when it is safe for Sluice."""
    if not maxmemory:
        return None  # no limit: nothing is evicted or refused (size the instance instead)
    if policy == "noeviction":
        return ("maxmemory-policy noeviction: once Redis is full it refuses every rate-limit "
                "decision, and every policy's failureMode then answers for all clients")
    if policy.startswith("allkeys-"):
        return (f"maxmemory-policy {policy}: Redis may evict Sluice's config documents (a sidecar "
                "starting then has no config until the next resync)")
    return None


class MemoryPolicyCheck:
    """Reads the setting and warns once per change of what it finds."""

    def __init__(self, client: configstore.Client, metrics: OperatorMetrics) -> None:
        self._client = client
        self._metrics = metrics
        self._read_at: float | None = None
        self.finding: str | None = None  # the last warning, None when safe (or never read)

    async def run(self, *, max_age: float = 0.0) -> str | None:
        """Read the setting unless it was read less than ``max_age`` seconds ago; return the
        current finding."""
        now = time.monotonic()
        if self._read_at is not None and now - self._read_at < max_age:
            return self.finding
        self._read_at = now
        try:
            settings = await configstore.memory_settings(self._client)
        except configstore.ConfigStoreError as exc:
            log.info("cannot read Redis's maxmemory-policy (neither CONFIG GET nor INFO memory "
                     "answered): %s", exc)
            return self.finding
        found = next((p for p in (problem(m, pol) for m, pol in settings) if p), None)
        if found != self.finding:
            if found is not None:
                log.warning("Redis is not configured as Sluice needs: %s; set maxmemory-policy %s "
                            "(every bucket has a TTL, config documents have none)", found, RECOMMENDED)
            elif self.finding is not None:
                log.info("Redis maxmemory-policy is now safe for Sluice")
            self.finding = found
        self._metrics.redis_eviction_unsafe.set(1 if found else 0)
        return found
