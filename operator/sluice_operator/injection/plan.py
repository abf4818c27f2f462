"""The plan of a pod's injection: the JSONPatch that adds the sidecar, or why not.

How injection routes traffic without iptables: the sidecar takes over the app container's
*named* port (``http`` unless the ``sluice.dev/port`` annotation names another). The app
container's port keeps its number but is renamed ``<name>-app``; the sidecar listens on a
new port number (annotation ``sluice.dev/sidecar-port``, else ``InjectionSettings.sidecar_port``
or the next free one above it) under the original name, so a Service's ``targetPort: http``
now lands on the sidecar, which forwards to ``http://127.0.0.1:<app port>``. Probes that
named the port are rewritten to the app's port number: kubelet checks never pass through the
sidecar. A Service with a numeric ``targetPort`` still goes straight to the app.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice_operator.injection.container import sidecar_container
from sluice_operator.injection.names import INJECTED_ANNOTATION, PODINFO_VOLUME, PORT_ANNOTATION
from sluice_operator.injection.pod import NotInjected, PodView, is_injected
from sluice_operator.injection.ports import find_app_port, pick_ports
from sluice_operator.injection.probes import probe_rewrites
from sluice_operator.injection.settings import InjectionSettings

Patch = list[dict[str, Any]]


def plan_injection(pod: Mapping[str, Any], settings: InjectionSettings) -> tuple[Patch, list[str]]:
    """The JSONPatch that injects the sidecar, or ``([], [why not])`` to leave the pod alone."""
    if is_injected(pod):
        return [], []
    try:
        return _plan(PodView.of(pod), settings)
    except NotInjected as exc:
        return [], [f"sluice: sidecar not injected: {exc}; the pod runs without rate limiting"]


def _plan(pod: PodView, settings: InjectionSettings) -> tuple[Patch, list[str]]:
    app, warnings = find_app_port(pod, pod.annotations.get(PORT_ANNOTATION) or settings.default_port_name)
    if pod.has_volume(PODINFO_VOLUME):
        raise NotInjected(f"the pod already has a volume named {PODINFO_VOLUME!r}")
    ports = pick_ports(pod, app, settings)
    patch = [_mark_injected(pod),
             {"op": "replace", "path": f"/spec/containers/{app.container}/ports/{app.index}/name",
              "value": ports.app_port_name}]
    if app.fields.get("hostPort"):
        warnings.append(f"sluice: port {app.name!r} has hostPort {app.fields['hostPort']}: traffic "
                        "to the node's port bypasses the sidecar")
    patch += probe_rewrites(pod, app)
    patch.append({"op": "add", "path": "/spec/containers/-", "value": sidecar_container(
        settings, app.name, ports.listen, ports.admin, app.number)})
    patch.append(_add_podinfo_volume(pod))
    if pod.spec.get("hostNetwork"):
        warnings.append(f"sluice: the pod uses hostNetwork: the sidecar listens on the node's ports "
                        f"{ports.listen} and {ports.admin}")
    return patch, warnings


def _mark_injected(pod: PodView) -> dict[str, Any]:
    if "annotations" in pod.meta and isinstance(pod.meta["annotations"], Mapping):
        return {"op": "add", "path": f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}",
                "value": "true"}
    return {"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}}


def _add_podinfo_volume(pod: PodView) -> dict[str, Any]:
    """The downward-API volume the sidecar reads the pod's labels from (policy selectors)."""
    volume = {"name": PODINFO_VOLUME, "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
    if isinstance(pod.spec.get("volumes"), list):
        return {"op": "add", "path": "/spec/volumes/-", "value": volume}
    return {"op": "add", "path": "/spec/volumes", "value": [volume]}


def _escape(key: str) -> str:
    """A JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
