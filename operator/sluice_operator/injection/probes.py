"""Probes and lifecycle hooks that named the app's port are pointed at its number: kubelet
checks never pass through the sidecar (which now holds that name)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sluice_operator.injection.pod import PodView, has_port_named
from sluice_operator.injection.ports import AppPort
from sluice_operator.objects import nested

_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
_HOOKS = ("postStart", "preStop")
_HANDLERS = ("httpGet", "tcpSocket")


def probe_rewrites(pod: PodView, app: AppPort) -> list[dict[str, Any]]:
    """JSONPatch operations replacing the port name by the app's number. Named probe ports
    resolve in the probe's own container, so other containers are only rewritten when they
    have no port of that name of their own."""
    ops: list[dict[str, Any]] = []
    for key, idx, container in _containers(pod):
        if has_port_named(container, app.name) and not (key == "containers" and idx == app.container):
            continue
        ops += [{"op": "replace", "path": f"/spec/{key}/{idx}/{field}", "value": app.number}
                for field in _fields_naming(container, app.name)]
    return ops


def _containers(pod: PodView) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    for key, group in (("containers", pod.containers), ("initContainers", pod.init_containers)):
        for idx, container in enumerate(group):
            yield key, idx, container


def _fields_naming(container: Mapping[str, Any], port_name: str) -> Iterator[str]:
    """The JSON pointers (below the container) of every probe or hook port naming ``port_name``."""
    for probe in _PROBES:
        for handler in _HANDLERS:
            if nested(container, probe, handler, "port") == port_name:
                yield f"{probe}/{handler}/port"
    for hook in _HOOKS:
        for handler in _HANDLERS:
            if nested(container, "lifecycle", hook, handler, "port") == port_name:
                yield f"lifecycle/{hook}/{handler}/port"
