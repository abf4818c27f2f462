"""The pod's ``terminationGracePeriodSeconds`` against the sidecar's drain.

An injected pod stops in this order: the app's preStop hook asks the sidecar to drain (not
ready, ``Connection: close`` for ``--drain-s``, then up to ``--shutdown-timeout-s`` for the
requests in flight), only then does the app get SIGTERM and shut down, and the sidecar stops
last. All of it counts against the grace period, after which the kubelet SIGKILLs whatever is
left: mid-drain, requests fail. So the sidecar's part (:func:`sidecar_stop_s`) comes on top of
the time the app needs for itself.

* The API server fills in Kubernetes' default (30 s) before any admission webhook sees the pod,
  so 30 is taken as "not set": the app keeps its 30 s and the injector raises the period by the
  sidecar's part. (A pod that really asked for 30 gets more: a grace period is a bound, never a
  delay; a pod that stops sooner is gone sooner.)
* Any other value is the owner's choice and is kept; when it leaves the app less than
  :data:`APP_MIN_S` after the sidecar's part, the admission says so (a warning, and an Event on
  the pod's owner, where a Deployment's user looks: a controller's admission warnings reach
  no one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sluice_core.settingsform import flags
from sluice_core.sidecar_settings import SidecarSettings

from sluice_operator.injection.settings import InjectionSettings

DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod sets none
APP_MIN_S = 5  # what an explicit period should leave the app after the sidecar's part, at least
_SIDECAR = {f.field: f for f in flags(SidecarSettings)}


def _sidecar_value(settings: InjectionSettings, name: str) -> float:
    """A sidecar setting as the injected container gets it: ``--sidecar-env`` or its default."""
    flag = _SIDECAR[name]
    try:
        return max(0.0, float(settings.extra_env.get(flag.env, flag.default)))
    except ValueError:  # the sidecar refuses it at start; count its default meanwhile
        return float(flag.default)


def sidecar_stop_s(settings: InjectionSettings) -> int:
    """Seconds the sidecar may take of a pod's termination: its drain and its wait for the
    requests in flight, rounded up."""
    return math.ceil(_sidecar_value(settings, "drain_s") + _sidecar_value(settings, "shutdown_timeout_s"))


def grace_period(spec: Mapping[str, Any]) -> int:
    value = spec.get("terminationGracePeriodSeconds")
    return value if isinstance(value, int) and not isinstance(value, bool) else DEFAULT_GRACE_S


def raised_grace(spec: Mapping[str, Any], settings: InjectionSettings) -> dict[str, Any] | None:
    """The patch that makes room for the sidecar in a pod with the default period, else None."""
    if grace_period(spec) != DEFAULT_GRACE_S:
        return None
    op = "replace" if "terminationGracePeriodSeconds" in spec else "add"
    return {"op": op, "path": "/spec/terminationGracePeriodSeconds",
            "value": DEFAULT_GRACE_S + sidecar_stop_s(settings)}


def too_short(spec: Mapping[str, Any], settings: InjectionSettings) -> str | None:
    """Why a pod's explicit period is too short for the sidecar's drain (None: it is not)."""
    grace, stop = grace_period(spec), sidecar_stop_s(settings)
    if grace == DEFAULT_GRACE_S or grace >= stop + APP_MIN_S:
        return None
    return (f"sluice: terminationGracePeriodSeconds {grace} is too short: the sidecar's drain takes up to "
            f"{stop} s (SLUICE_DRAIN_S + SLUICE_SHUTDOWN_TIMEOUT_S) before the app's SIGTERM; the kubelet "
            f"may kill the pod mid-drain. Set at least {stop + APP_MIN_S}")
