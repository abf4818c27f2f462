"""The pod as injection reads it: its containers and ports, tolerant of missing fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluice_operator.injection.names import INJECTED_ANNOTATION, SIDECAR_NAME
from sluice_operator.objects import nested


class NotInjected(Exception):
    """The pod cannot take the sidecar; the reason becomes the webhook's warning."""


@dataclass(frozen=True)
class PodView:
    meta: Mapping[str, Any]
    annotations: Mapping[str, Any]
    spec: Mapping[str, Any]
    containers: list[Mapping[str, Any]]
    init_containers: list[Mapping[str, Any]]

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        return cls(meta=meta, annotations=meta.get("annotations") or {}, spec=spec,
                   containers=_containers(spec, "containers"),
                   init_containers=_containers(spec, "initContainers"))

    def all_ports(self) -> list[Mapping[str, Any]]:
        """Every port of every container, init containers included."""
        return [p for c in [*self.containers, *self.init_containers] for p in c.get("ports") or []
                if isinstance(p, Mapping)]

    def has_volume(self, name: str) -> bool:
        return any(isinstance(v, Mapping) and v.get("name") == name
                   for v in self.spec.get("volumes") or [])


def _containers(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return [c for c in spec.get(key) or [] if isinstance(c, Mapping)]


def is_injected(pod: Mapping[str, Any]) -> bool:
    """The annotation the patch sets, or a container of the sidecar's name: inject once."""
    if (nested(pod, "metadata", "annotations") or {}).get(INJECTED_ANNOTATION) == "true":
        return True
    spec = pod.get("spec") or {}
    return any(isinstance(c, Mapping) and c.get("name") == SIDECAR_NAME
               for key in ("containers", "initContainers") for c in spec.get(key) or [])


def has_port_named(container: Mapping[str, Any], name: str) -> bool:
    return any(isinstance(p, Mapping) and p.get("name") == name
               for p in container.get("ports") or [])
