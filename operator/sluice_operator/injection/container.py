"""The injected container: a cluster-mode sidecar in front of the app's port on 127.0.0.1."""

from __future__ import annotations

import copy
from typing import Any

from sluice_core.settingsform import flags
from sluice_core.sidecar_settings import SidecarSettings

from sluice_operator.injection.names import (
    ADMIN_PORT_NAME,
    PODINFO_MOUNT,
    PODINFO_VOLUME,
    REDIS_CA_KEY,
    REDIS_CA_MOUNT,
    REDIS_CA_VOLUME,
    SIDECAR_NAME,
)
from sluice_operator.injection.settings import SIDECAR_REDIS_ENV, InjectionSettings

_FLAG = {f.field: f.name for f in flags(SidecarSettings) if f.key is None}
_SIDECAR_ENV = {f.field: f.env for f in flags(SidecarSettings) if f.key is None}
"""The sidecar's flags by setting (``pod_labels`` -> ``--pod-labels``): its schema's names."""


def sidecar_container(settings: InjectionSettings, port_name: str, port: int, admin_port: int,
                      app_port: int, *, drain_token: str | None = None,
                      without_config: str = "refuse") -> dict[str, Any]:
    """The injected container: cluster-mode sidecar in front of ``127.0.0.1:<app_port>``; a
    native sidecar (``restartPolicy: Always``, for ``initContainers``) when the settings say so.
    ``drain_token``: what the app's preStop hook sends to ``/drain``; ``without_config``: the
    sidecar's ``--without-config`` (:func:`sluice_operator.injection.failmode.without_config`)."""
    wiring = {"upstream": f"http://127.0.0.1:{app_port}", "listen": f"0.0.0.0:{port}",
              "admin_listen": f"0.0.0.0:{admin_port}"}
    if settings.redis_url_secret is None and settings.redis_url:
        wiring["redis"] = settings.redis_url
    wiring |= {"namespace": "$(POD_NAMESPACE)", "pod_labels": f"{PODINFO_MOUNT}/labels",
               "pod_name": "$(POD_NAME)"}
    args = ["sidecar"]
    for name, value in wiring.items():
        args += [_FLAG[name], value]
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "env": _env(settings, drain_token, without_config),
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"},
                  {"name": ADMIN_PORT_NAME, "containerPort": admin_port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
                           "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME},
                          "periodSeconds": 10, "failureThreshold": 3},
        "resources": copy.deepcopy(dict(settings.resources)),
        "securityContext": _security_context(settings),
        "volumeMounts": [{"name": PODINFO_VOLUME, "mountPath": PODINFO_MOUNT, "readOnly": True}],
    }
    if settings.redis_ca_file:  # the operator's copy of the CA in the pod's namespace (plan.py)
        container["volumeMounts"].append({"name": REDIS_CA_VOLUME, "mountPath": REDIS_CA_MOUNT, "readOnly": True})
    if settings.native_sidecar:
        container["restartPolicy"] = "Always"
    return container


def _env(settings: InjectionSettings, drain_token: str | None, without_config: str) -> list[dict[str, Any]]:
    """The pod's identity, the drain token, what to do before a config, the Redis URL from a
    Secret, and the tuning as ``SLUICE_*``."""
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": _SIDECAR_ENV["without_config"], "value": without_config},
    ]
    if drain_token is not None:
        env.append({"name": _SIDECAR_ENV["drain_token"], "value": drain_token})
    if settings.redis_url_secret is not None:
        secret, key = settings.redis_url_secret
        env.append({"name": SIDECAR_REDIS_ENV,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    if settings.redis_ca_file:
        env.append({"name": _SIDECAR_ENV["redis_ca_file"], "value": f"{REDIS_CA_MOUNT}/{REDIS_CA_KEY}"})
    env += [{"name": k, "value": v} for k, v in settings.sidecar_env().items()]
    env += [{"name": k, "value": v} for k, v in settings.extra_env.items()]
    return env


def _security_context(settings: InjectionSettings) -> dict[str, Any]:
    security: dict[str, Any] = {
        "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    if settings.run_as_user is not None:
        security["runAsUser"] = settings.run_as_user
        security["runAsGroup"] = settings.run_as_user
    return security
