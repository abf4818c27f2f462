"""The plan of a pod's injection: the JSONPatch that adds the sidecar, or why not.

How injection routes traffic without iptables: the sidecar takes over the app container's
*named* port (``http`` unless the ``sluice.dev/port`` annotation names another). The app
container's port keeps its number but is renamed ``<name>-app``; the sidecar listens on a
new port number (annotation ``sluice.dev/sidecar-port``, else ``InjectionSettings.sidecar_port``
or the next free one above it) under the original name, so a Service's ``targetPort: http``
now lands on the sidecar, which forwards to ``http://127.0.0.1:<app port>``. Probes that
named the port are rewritten to the app's port number: kubelet checks never pass through the
sidecar. A Service with a numeric ``targetPort`` still goes straight to the app.

Termination without 502s: where the API server supports native sidecars (Kubernetes 1.29+),
the sidecar is an init container with ``restartPolicy: Always``, so the kubelet starts it
before the app and stops it after. Either way the app container gets a preStop hook, ``GET
/drain`` on the sidecar's admin port with a random per-pod token: the sidecar stops being
ready, answers with ``Connection: close`` for ``--drain-s`` while the endpoint is removed,
stops accepting, waits for in-flight requests, and only then answers, after which the kubelet
sends the app SIGTERM. An app that exits on SIGTERM at once thus never leaves the sidecar
forwarding to nothing. An app with a preStop hook of its own keeps it (a warning says the
sidecar is then told only by its own SIGTERM).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from sluice_operator.injection.container import sidecar_container
from sluice_operator.injection.failmode import REFUSE
from sluice_operator.injection.grace import raised_grace, too_short
from sluice_operator.injection.names import (
    DRAIN_PATH,
    DRAIN_TOKEN_HEADER,
    INJECTED_ANNOTATION,
    PODINFO_VOLUME,
    PORT_ANNOTATION,
    REDIS_CA_CONFIGMAP,
    REDIS_CA_VOLUME,
)
from sluice_operator.injection.pod import NotInjected, PodView, is_injected
from sluice_operator.injection.ports import find_app_port, pick_ports
from sluice_operator.injection.probes import probe_rewrites
from sluice_operator.injection.settings import InjectionSettings

Patch = list[dict[str, Any]]


def plan_injection(pod: Mapping[str, Any], settings: InjectionSettings, *,
                   without_config: str = REFUSE) -> tuple[Patch, list[str]]:
    """The JSONPatch that injects the sidecar, or ``([], [why not])`` to leave the pod alone.
    ``without_config``: the sidecar's ``--without-config`` (:mod:`.failmode`)."""
    if is_injected(pod):
        return [], []
    try:
        return _plan(PodView.of(pod), settings, without_config)
    except NotInjected as exc:
        return [], [f"sluice: sidecar not injected: {exc}; the pod runs without rate limiting"]


def _plan(pod: PodView, settings: InjectionSettings, without_config: str) -> tuple[Patch, list[str]]:
    app, warnings = find_app_port(pod, pod.annotations.get(PORT_ANNOTATION) or settings.default_port_name)
    for volume in (PODINFO_VOLUME, *((REDIS_CA_VOLUME,) if settings.redis_ca_file else ())):
        if pod.has_volume(volume):
            raise NotInjected(f"the pod already has a volume named {volume!r}")
    ports = pick_ports(pod, app, settings)
    patch = [_mark_injected(pod),
             {"op": "replace", "path": f"/spec/containers/{app.container}/ports/{app.index}/name",
              "value": ports.app_port_name}]
    if app.fields.get("hostPort"):
        warnings.append(f"sluice: port {app.name!r} has hostPort {app.fields['hostPort']}: traffic "
                        "to the node's port bypasses the sidecar")
    patch += probe_rewrites(pod, app)
    token = secrets.token_urlsafe(18)
    sidecar = sidecar_container(settings, app.name, ports.listen, ports.admin, app.number,
                                drain_token=token, without_config=without_config)
    patch.append(_add_sidecar(pod, sidecar, native=settings.native_sidecar))
    hook = _app_prestop(pod, app.container, ports.admin, token)
    if hook is None:
        warnings.append(f"sluice: container {pod.containers[app.container].get('name')!r} has a preStop "
                        "hook of its own: the sidecar learns of the pod's termination only from its own "
                        "SIGTERM (make the hook wait a few seconds, or requests may fail while the pod stops)")
    else:
        patch.append(hook)
    patch.append(_add_volume(pod, {"name": PODINFO_VOLUME, "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}))  # policy selectors
    if settings.redis_ca_file:  # the ConfigMap the webhook server keeps (redisca.py)
        patch.append({"op": "add", "path": "/spec/volumes/-",
                      "value": {"name": REDIS_CA_VOLUME, "configMap": {"name": REDIS_CA_CONFIGMAP}}})
    grace = raised_grace(pod.spec, settings)  # the drain comes before the app's own shutdown
    if grace is not None:
        patch.append(grace)
    if short := too_short(pod.spec, settings):
        warnings.append(short)
    if pod.spec.get("hostNetwork"):
        warnings.append(f"sluice: the pod uses hostNetwork: the sidecar listens on the node's ports "
                        f"{ports.listen} and {ports.admin}")
    return patch, warnings


def _add_sidecar(pod: PodView, sidecar: dict[str, Any], *, native: bool) -> dict[str, Any]:
    """A native sidecar goes last among the init containers (those before it run to completion
    first, as they did before injection); else last among the containers."""
    if not native:
        return {"op": "add", "path": "/spec/containers/-", "value": sidecar}
    if isinstance(pod.spec.get("initContainers"), list):
        return {"op": "add", "path": "/spec/initContainers/-", "value": sidecar}
    return {"op": "add", "path": "/spec/initContainers", "value": [sidecar]}


def _app_prestop(pod: PodView, index: int, admin_port: int, token: str) -> dict[str, Any] | None:
    """The app container's preStop hook that drains the sidecar first, or None when the app
    has a hook of its own (a container has one; it stays the app's)."""
    hook = {"httpGet": {"path": DRAIN_PATH, "port": admin_port, "scheme": "HTTP",
                        "httpHeaders": [{"name": DRAIN_TOKEN_HEADER, "value": token}]}}
    lifecycle = pod.containers[index].get("lifecycle")
    path = f"/spec/containers/{index}/lifecycle"
    if not isinstance(lifecycle, Mapping):
        return {"op": "add", "path": path, "value": {"preStop": hook}}
    if lifecycle.get("preStop"):
        return None
    return {"op": "add", "path": path + "/preStop", "value": hook}


def _mark_injected(pod: PodView) -> dict[str, Any]:
    if "annotations" in pod.meta and isinstance(pod.meta["annotations"], Mapping):
        return {"op": "add", "path": f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}",
                "value": "true"}
    return {"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}}


def _add_volume(pod: PodView, volume: dict[str, Any]) -> dict[str, Any]:
    """The first volume the patch adds (the list may not exist yet)."""
    if isinstance(pod.spec.get("volumes"), list):
        return {"op": "add", "path": "/spec/volumes/-", "value": volume}
    return {"op": "add", "path": "/spec/volumes", "value": [volume]}


def _escape(key: str) -> str:
    """A JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
