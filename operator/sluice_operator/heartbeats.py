"""Which sidecars enforce what: every namespace's fresh heartbeats, read in one command an
interval however many namespaces and policies the operator serves (the ``Enforced`` condition).

Sidecars from before the global heartbeat set wrote one hash per namespace instead. They
still count, at any time (a rollback, an old Deployment pinned to an old image): every refresh
looks for the served namespaces' hashes (one EXISTS a thousand namespaces; a hash expires with
its sidecars) and reads those that exist."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sluice_core import configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE

log = logging.getLogger("sluice.operator")


class HeartbeatView:
    def __init__(self, redis_client: configstore.Client, stale_s: float) -> None:
        self.redis = redis_client
        self.stale_s = stale_s
        self._pods: dict[str, dict[str, keyschema.Heartbeat]] = {}  # namespace -> pod -> newest
        self._legacy: set[str] = set()  # namespaces where sidecars of an older release beat
        self._refreshes = 0

    async def refresh(self, namespaces: Iterable[str]) -> None:
        """Read what changed: the fresh heartbeats, old sidecars' ones, stale ones pruned.
        ``namespaces``: those served (where old sidecars may beat). A failed read keeps what
        was known and raises :class:`~sluice_core.configstore.ConfigStoreError`."""
        now = time.time()
        pods: dict[str, dict[str, keyschema.Heartbeat]] = {}
        for member, at in await configstore.fresh_heartbeats(self.redis, now - self.stale_s):
            parsed = keyschema.parse_heartbeat_member(member, at)
            if parsed is None:
                continue
            ns, pod, beat = parsed
            seen = pods.setdefault(ns, {})
            if pod not in seen or seen[pod].at <= beat.at:  # a pod's state changed: its newest
                seen[pod] = beat
        await configstore.prune_heartbeats(self.redis, now - self.stale_s)
        await self._read_legacy(pods, namespaces, now)
        self._refreshes += 1
        self._pods = pods

    async def _read_legacy(self, pods: dict[str, dict[str, keyschema.Heartbeat]],
                           namespaces: Iterable[str], now: float) -> None:
        found: set[str] = set()
        for ns in await configstore.legacy_heartbeat_namespaces(self.redis, sorted(set(namespaces))):
            entries = await configstore.heartbeats(self.redis, ns)
            stale = []
            for pod, value in entries.items():
                beat = keyschema.parse_heartbeat(value)
                if now - beat.at > self.stale_s:
                    stale.append(pod)
                    continue
                found.add(ns)
                name = pod.decode(errors="replace") if isinstance(pod, bytes) else pod
                pods.setdefault(ns, {}).setdefault(name, beat)
            if stale:
                await configstore.drop_heartbeats(self.redis, ns, stale)
        if found - self._legacy:
            log.info("sidecars of an older release (per-namespace heartbeats) in %s", ", ".join(sorted(found - self._legacy)))
        self._legacy = found

    def count(self, namespaces: Iterable[str], policy: str, version: int, *, cluster: bool = False) -> int:
        """How many sidecars of ``namespaces`` enforce ``policy`` at ``version`` (of their
        namespace's document, or of the cluster document)."""
        n = 0
        for ns in namespaces:
            for beat in self._pods.get(ns, {}).values():
                if cluster:
                    n += beat.cluster_version == version and beat.cluster_policy_ref == policy
                else:
                    n += beat.version == version and beat.policy_ref == policy
        return n

    def behind(self, namespaces: Iterable[str], version: int, *, cluster: bool = False) -> dict[str, set[str]]:
        """Per namespace, the fresh sidecars (pod names) whose heartbeat reports an older
        version of the namespace's document (or of the cluster document) than ``version``, the
        one written: sidecars about to report the new one (a heartbeat interval after a push)
        or stuck on an old one (the alert waits minutes for the first to pass). Namespaces with
        none are left out, so the metric made of it stays small however many are served."""
        out: dict[str, set[str]] = {}
        for ns in namespaces:
            pods = {pod for pod, b in self._pods.get(ns, {}).items()
                    if (b.cluster_version if cluster else b.version) < version}
            if pods:
                out[ns] = pods
        return out

    def enforced_refs(self) -> set[tuple[str, str]]:
        """(scope, policy name) of what fresh sidecars say they enforce: namespace policies
        under their namespace, cluster policies under ``_cluster``."""
        refs: set[tuple[str, str]] = set()
        for ns, by_pod in self._pods.items():
            for beat in by_pod.values():
                if beat.policy_ref:
                    refs.add((ns, beat.policy_ref))
                if beat.cluster_policy_ref:
                    refs.add((CLUSTER_SCOPE, beat.cluster_policy_ref))
        return refs

    def capabilities(self, namespace: str) -> frozenset[str] | None:
        """What every fresh sidecar of the namespace can do (None: one of them is of a release
        from before capabilities were reported, or none reports)."""
        beats = list(self._pods.get(namespace, {}).values())
        if not beats or any(b.capabilities is None for b in beats):
            return None
        return frozenset.intersection(*(b.capabilities or frozenset() for b in beats))

    def grants_ready(self, namespace: str | None) -> bool | None:
        """Does every fresh sidecar of the namespace (None: of every namespace) read API keys
        from Redis grants? Only positive evidence says so: True when at least one beats and
        each one that does reports the ``grants`` capability; False when one does not (an older
        release, a per-namespace heartbeat); None when there is no evidence: heartbeats not
        read yet, or no sidecar beats there (none running, all restarting, or sidecars that
        send none: cluster mode without ``--pod-name``)."""
        if not self._refreshes:
            return None
        pods = self._pods.values() if namespace is None else [self._pods.get(namespace, {})]
        beats = [b for by_pod in pods for b in by_pod.values()]
        if not beats:
            return None
        return all(b.capabilities is not None and keyschema.CAPABILITY_REDIS_GRANTS in b.capabilities
                   for b in beats)

    def forget(self, namespace: str) -> None:
        self._pods.pop(namespace, None)
        self._legacy.discard(namespace)
