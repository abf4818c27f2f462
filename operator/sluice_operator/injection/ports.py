"""Ports: find the app's named port the sidecar takes over, pick the sidecar's and the admin
port numbers, and the new name of the app's port (``<name>-app``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluice_operator.injection.names import (
    ADMIN_PORT_NAME,
    PORT_ANNOTATION,
    SIDECAR_PORT_ANNOTATION,
)
from sluice_operator.injection.pod import NotInjected, PodView
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.injection.values import MAX_PORT_NAME, PORT_NAME_RE


@dataclass(frozen=True)
class AppPort:
    """The app's port the sidecar takes over: ``spec.containers[container].ports[index]``."""

    name: str
    container: int
    index: int
    number: int
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class SidecarPorts:
    listen: int  # client traffic, under the app port's old name
    admin: int
    app_port_name: str  # the app's port renamed


def find_app_port(pod: PodView, port_name: str) -> tuple[AppPort, list[str]]:
    """The first container port named ``port_name`` (with a warning when several are)."""
    found = [(ci, pi, p) for ci, c in enumerate(pod.containers)
             for pi, p in enumerate(c.get("ports") or [])
             if isinstance(p, Mapping) and p.get("name") == port_name]
    if not found:
        raise NotInjected(f"no container port named {port_name!r} ({_named_ports_hint(pod)})")
    ci, pi, port = found[0]
    warnings: list[str] = []
    if len(found) > 1:
        warnings.append(f"sluice: several containers have a port named {port_name!r}; the "
                        f"sidecar fronts the first, container {pod.containers[ci].get('name')!r}")
    if (port.get("protocol") or "TCP") != "TCP":
        raise NotInjected(f"port {port_name!r} is {port.get('protocol')}, the sidecar proxies HTTP over TCP")
    number = port.get("containerPort")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
        raise NotInjected(f"port {port_name!r} has no valid containerPort")
    return AppPort(port_name, ci, pi, number, port), warnings


def _named_ports_hint(pod: PodView) -> str:
    named = sorted({p["name"] for c in pod.containers for p in c.get("ports") or []
                    if isinstance(p, Mapping) and p.get("name")})
    if named:
        return f"named ports are {', '.join(named)}: set the {PORT_ANNOTATION} annotation"
    return "give the app's port a name (e.g. http)"


def pick_ports(pod: PodView, app: AppPort, settings: InjectionSettings) -> SidecarPorts:
    """The sidecar's port (the annotation's, else the first free one from the settings'), the
    admin port (first free one from the settings'), and the app port's new name."""
    ports = pod.all_ports()
    used_numbers: set[int] = {p["containerPort"] for p in ports
                              if isinstance(p.get("containerPort"), int)}
    used_names: set[str] = {p["name"] for p in ports if isinstance(p.get("name"), str)}
    listen = _requested_port(pod.annotations.get(SIDECAR_PORT_ANNOTATION), used_numbers)
    if listen is None:
        listen = _free_port(settings.sidecar_port, used_numbers)
    admin = _free_port(settings.admin_port, used_numbers | {listen})
    if ADMIN_PORT_NAME in used_names:
        raise NotInjected(f"a container already has a port named {ADMIN_PORT_NAME!r}")
    return SidecarPorts(listen, admin, app_port_name(app.name, used_names | {ADMIN_PORT_NAME}))


def _requested_port(requested: Any, used: set[int]) -> int | None:
    """The ``sluice.dev/sidecar-port`` annotation's number, None when there is none."""
    if requested is None:
        return None
    if not str(requested).isdigit() or not 0 < int(requested) < 65536:
        raise NotInjected(f"annotation {SIDECAR_PORT_ANNOTATION}={requested!r} is not a port number")
    if int(requested) in used:
        raise NotInjected(f"annotation {SIDECAR_PORT_ANNOTATION}={requested} is already a container port")
    return int(requested)


def _free_port(start: int, used: set[int]) -> int:
    port = start
    while port in used:
        port += 1
    if port > 65535:
        raise ValueError(f"no free port at or above {start}")
    return port


def app_port_name(base: str, taken: set[str]) -> str:
    """``<base>-app`` shortened to 15 characters, unique among ``taken``."""
    for n in ["", *map(str, range(2, 10))]:
        suffix = f"-app{n}"
        stem = base[: MAX_PORT_NAME - len(suffix)].rstrip("-")
        candidate = stem + suffix
        if candidate not in taken and PORT_NAME_RE.fullmatch(candidate):
            return candidate
    raise ValueError(f"no free name for the app's port {base!r}")
