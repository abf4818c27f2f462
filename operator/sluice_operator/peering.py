"""Several operator replicas (kopf peering): which one leads, and a clear error when the
peering object kopf waits for is missing."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any


def peering_priority() -> int:
    """kopf runs only the replica with the highest priority and pauses all of them when two are
    equal. The oldest replica leads: the priority falls with the start time (ms), so a new
    replica (a rollout, a replacement) waits instead of taking over from a working one; three
    random digits keep replicas started in the same millisecond apart."""
    return -(time.time_ns() // 1_000_000 * 1000 + random.randrange(1000))


def configure_peering(registry: Any, name: str, lifetime_s: int) -> None:
    import kopf

    @kopf.on.startup(registry=registry)
    async def peering(settings: kopf.OperatorSettings, **_: Any) -> None:
        # One ClusterKopfPeering for the whole operator, also when --namespace restricts it:
        # namespaced peering would need a KopfPeering in every served namespace, and a replica
        # stays paused in any namespace that lacks one.
        settings.peering.clusterwide = True
        settings.peering.lifetime = lifetime_s
        # kopf waits (paused, silently) for a peering object that does not exist: say so.
        await asyncio.to_thread(_check_peering_object, name)


def _check_peering_object(name: str) -> None:
    """Log an error when the ClusterKopfPeering ``name`` or its CRD is missing (list: a verb
    the operator has for kopf anyway)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from sluice_operator.kube import default_api_client

    log = logging.getLogger("sluice.operator")
    try:
        found: dict[str, Any] = client.CustomObjectsApi(  # type: ignore[assignment]
            default_api_client()).list_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", field_selector=f"metadata.name={name}")
    except ApiException as exc:
        if exc.status != 404:
            log.warning("cannot check the ClusterKopfPeering %r: %s", name, exc.reason)
            return
        missing = "the ClusterKopfPeering CRD (clusterkopfpeerings.kopf.dev) is not installed"
    except Exception as exc:  # a check only: kopf reports connection problems itself
        log.warning("cannot check the ClusterKopfPeering %r: %s", name, exc)
        return
    else:
        if found.get("items"):
            return
        missing = "the ClusterKopfPeering object does not exist"
    log.error("peering %r: %s; this replica stays paused until it exists (apiVersion: "
              "kopf.dev/v1, kind: ClusterKopfPeering, metadata.name: %s)", name, missing, name)


class PeeringGate:
    """Is this replica the active one? What the operator's own resync task asks before it
    writes: kopf pauses its handlers, timers and daemons on a replica that is not, but not a
    task of ours, and a paused replica's view of the cluster is frozen (its watches stop).

    kopf's rule, read from the ClusterKopfPeering's status: active while no live peer has the
    same or a higher priority. Read at most once per ``max_age_s`` (one GET an interval)."""

    def __init__(self, name: str, identity: str, priority: int, api_client: Any,
                 max_age_s: float = 5.0) -> None:
        self.name, self.identity, self.priority = name, identity, priority
        self._api_client = api_client
        self._api: Any = None  # made at the first read, in a thread (it may read a kubeconfig)
        self._max_age_s = max_age_s
        self._checked: tuple[float, bool] | None = None

    async def active(self) -> bool:
        if self._checked and time.monotonic() - self._checked[0] < self._max_age_s:
            return self._checked[1]
        try:
            status = await asyncio.to_thread(self._status)
        except Exception as exc:  # unreadable: not active (kopf pauses on its own failures too)
            logging.getLogger("sluice.operator").warning("cannot read the ClusterKopfPeering %r: %s",
                                                         self.name, exc)
            status = {}
        self._checked = (time.monotonic(), self.decide(status))
        return self._checked[1]

    def decide(self, status: dict[str, Any]) -> bool:
        from kopf._core.engines.peering import Identity, Peer

        if self.identity not in status:
            return False  # not announced yet: kopf has not resumed this replica either
        peers = [Peer(identity=Identity(k), **v) for k, v in status.items()
                 if k != self.identity and isinstance(v, dict)]
        return not any(p.priority >= self.priority for p in peers if not p.is_dead)

    def _status(self) -> dict[str, Any]:
        from kubernetes import client

        if self._api is None:
            self._api = client.CustomObjectsApi(self._api_client())
        # list by name, not get: list is a verb the operator has for kopf anyway (the chart's RBAC)
        found: dict[str, Any] = self._api.list_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", field_selector=f"metadata.name={self.name}")
        items = found.get("items") or [{}]
        return dict(items[0].get("status") or {})

