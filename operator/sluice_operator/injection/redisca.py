"""The Redis CA for injected sidecars: a copy of the operator's CA bundle
(``--sidecar-redis-ca-file``) in ConfigMap ``sluice-redis-ca`` of each namespace a sidecar is
injected into, which the injected pod mounts (:mod:`.plan`, :mod:`.container`).

Why copies made at admission: a pod can only mount a ConfigMap of its own namespace, and the
namespaces that get sidecars are not known at install (any namespace labelled, or any pod
labelled, later). The mutating webhook is the one place that sees every one of them, at the
moment the copy is needed: it makes sure the copy is there and current before it answers, so a
namespace created after install gets it with its first injected pod and the kubelet finds it
when it starts the pod. (A chart value naming a ConfigMap the user creates in each namespace
would break every namespace someone forgets; a namespace controller would copy into every
namespace of the cluster, or race the first pod.) A CA certificate is public, so a ConfigMap;
its rotation (the mounted Secret updated in place) reaches a namespace with its next injected
pod, and the kubelet refreshes the file in running pods.

Each replica remembers what it wrote where (``namespace -> bundle``), so a namespace costs the
API server one read the first time a replica injects there and none after, until the bundle
changes. Dry-run admissions (``kubectl --dry-run=server``) write nothing: the webhook declares
``sideEffects: NoneOnDryRun``. RBAC: ``create`` on configmaps (which cannot be limited by name)
and ``get``/``update`` on ``sluice-redis-ca`` only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sluice_operator.injection.names import REDIS_CA_CONFIGMAP, REDIS_CA_KEY

log = logging.getLogger("sluice.operator")
MANAGED_BY = {"app.kubernetes.io/managed-by": "sluice-operator"}
MAX_REMEMBERED = 10_000  # namespaces; past it the memory starts afresh (one read each again)
WAIT_S = 1.5  # an admission waits this long for the copy (the webhook's timeout is 3 s), then it goes on alone


class RedisCaCopies:
    def __init__(self, api_client: Any, ca_file: str) -> None:
        self.api_client, self.ca_file = api_client, ca_file
        self._written: dict[str, str] = {}  # namespace -> the bundle it holds
        self._lock = asyncio.Lock()  # one write at a time: admissions of one rollout come together
        self._writing: dict[str, asyncio.Task[str | None]] = {}  # namespace -> its write under way

    async def ensure_within(self, namespace: str, wait_s: float = WAIT_S) -> str | None:
        """:meth:`ensure`, waited for at most ``wait_s``: a slow API server must not make the
        webhook time out (the pod would then be admitted without its sidecar). Past it the
        write carries on and the pod is admitted: its kubelet retries the mount until the
        ConfigMap is there."""
        task = self._writing.get(namespace)
        if task is None:
            task = self._writing[namespace] = asyncio.create_task(self.ensure(namespace))
            task.add_done_callback(lambda _: self._writing.pop(namespace, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            return None

    async def ensure(self, namespace: str) -> str | None:
        """Make ConfigMap ``sluice-redis-ca`` of ``namespace`` hold the current bundle; None, or
        a warning for the pod's admission (the pod is admitted either way: its kubelet waits
        for the ConfigMap, which the next admission there writes)."""
        try:
            bundle = await asyncio.to_thread(Path(self.ca_file).read_text, "utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"sluice: the Redis CA {self.ca_file} cannot be read ({exc}): the sidecar may not trust Redis"
        if self._written.get(namespace) == bundle:
            return None
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, namespace, bundle)
            except Exception as exc:  # an API error: said, the pod admitted
                log.warning("cannot write ConfigMap %s/%s (the Redis CA): %s", namespace, REDIS_CA_CONFIGMAP, exc)
                return (f"sluice: ConfigMap {REDIS_CA_CONFIGMAP} (the Redis CA) could not be written in "
                        f"namespace {namespace}: the sidecar waits for it ({type(exc).__name__})")
        if len(self._written) >= MAX_REMEMBERED:
            self._written.clear()
        self._written[namespace] = bundle
        return None

    def _write(self, namespace: str, bundle: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api(self.api_client)
        body: Any = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": REDIS_CA_CONFIGMAP, "namespace": namespace, "labels": MANAGED_BY},
                "data": {REDIS_CA_KEY: bundle}}
        try:
            current = api.read_namespaced_config_map(REDIS_CA_CONFIGMAP, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                api.create_namespaced_config_map(namespace, body)
                log.info("ConfigMap %s/%s: the Redis CA, for injected sidecars", namespace, REDIS_CA_CONFIGMAP)
            except ApiException as created:
                if created.status != 409:  # another replica just wrote it: next time compared
                    raise
            return
        if (current.data or {}).get(REDIS_CA_KEY) != bundle:
            api.patch_namespaced_config_map(REDIS_CA_CONFIGMAP, namespace, {"data": {REDIS_CA_KEY: bundle}})
            log.info("ConfigMap %s/%s: the Redis CA updated", namespace, REDIS_CA_CONFIGMAP)
