"""Warning Events for what admission found wrong with an injected pod (a grace period too short
for the sidecar's drain, :mod:`.grace`).

An admission warning reaches whoever created the pod: ``kubectl run`` prints it, but for a
Deployment's pods that is the ReplicaSet controller, which drops it. So the warning is also an
Event on the pod's controller (its ``ownerReferences``: ``kubectl describe rs``), or on the pod
itself when it has a name and no owner. One Event per owner and reason while this replica runs
(a ReplicaSet's hundred pods say it once), at most :data:`REMEMBERED` owners remembered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("sluice.operator")
REMEMBERED = 4096


def involved_object(pod: Mapping[str, Any], namespace: str) -> dict[str, str] | None:
    """The pod's controller (or first owner), else the pod when it is named; None: neither."""
    meta = pod.get("metadata") or {}
    owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping)]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is not None and all(owner.get(k) for k in ("apiVersion", "kind", "name", "uid")):
        return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["name"],
                "uid": owner["uid"], "namespace": namespace}
    if meta.get("name"):
        return {"apiVersion": "v1", "kind": "Pod", "name": str(meta["name"]), "namespace": namespace}
    return None


class OwnerEvents:
    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self._said: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    async def warn(self, pod: Mapping[str, Any], namespace: str, reason: str, message: str) -> None:
        """Post ``message`` once per owner and reason; a failure is logged, never raised."""
        target = involved_object(pod, namespace)
        if target is None:
            return
        key = (namespace, target.get("uid") or target["name"], reason)
        if key in self._said:
            return
        self._said[key] = None
        while len(self._said) > REMEMBERED:
            self._said.popitem(last=False)
        try:
            await asyncio.to_thread(self._post, namespace, target, reason, message)
        except Exception as exc:  # the pod is admitted whatever happens to its Event
            log.warning("cannot post the %s Event on %s %s/%s: %s", reason, target["kind"], namespace,
                        target["name"], exc)

    def _post(self, namespace: str, target: dict[str, str], reason: str, message: str) -> None:
        from kubernetes import client

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body: Any = {"apiVersion": "v1", "kind": "Event",
                     "metadata": {"generateName": f"{target['name']}.", "namespace": namespace},
                     "involvedObject": target, "reason": reason, "message": message, "type": "Warning",
                     "source": {"component": "sluice-injector"},
                     "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        client.CoreV1Api(self.api_client).create_namespaced_event(namespace, body)
