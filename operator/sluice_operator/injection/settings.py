"""What the injected sidecar container looks like: the operator's injection settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kubernetes' IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', at
# least one letter, no leading, trailing or doubled '-'.
PORT_NAME_RE = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*")
MAX_PORT_NAME = 15


@dataclass(frozen=True)
class InjectionSettings:
    """What the injected sidecar container looks like (the operator's settings).

    Every sidecar flag also reads ``SLUICE_<FLAG>``; the tuning fields below are passed as
    those environment variables, the wiring (upstream, listen addresses, namespace, pod
    name and labels, Redis) as arguments.
    """

    image: str = "sluice:0.1.0"
    """Sidecar image (the project's one image; its entrypoint is ``sluice``)."""
    image_pull_policy: str = "IfNotPresent"
    redis_url: str | None = "redis://redis.sluice-system:6379"
    """Passed as ``--redis``. Leave None and set ``redis_url_secret`` to keep a password out
    of the pod spec."""
    redis_url_secret: tuple[str, str] | None = None
    """(Secret name, key) holding the Redis URL, read into ``SLUICE_REDIS``. The Secret must
    exist in the pod's namespace. Takes precedence over ``redis_url``."""
    redis_timeout_ms: int | None = 50
    """``SLUICE_REDIS_TIMEOUT_MS``: per decision, then the policy's failure mode applies."""
    redis_connect_timeout_ms: int | None = None
    breaker_threshold: int | None = None
    breaker_cooldown_s: float | None = None
    log_level: str | None = None
    client_limits: Mapping[str, int | float] = field(default_factory=dict)
    """The sidecar's client-side limits by setting name (``max_connections`` ->
    ``SLUICE_MAX_CONNECTIONS``); one left out keeps the sidecar's default."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """More ``SLUICE_*`` (or any) environment variables for the sidecar."""
    sidecar_port: int = 15080
    """Client traffic; the next free port above it is used if a container already uses it."""
    admin_port: int = 15090
    """``/metrics``, ``/healthz``, ``/readyz``; next free port above it on a collision."""
    default_port_name: str = "http"
    """The app port taken over when the pod has no ``sluice.dev/port`` annotation."""
    resources: Mapping[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},  # no CPU limit: throttling would add latency to every request
    })
    run_as_user: int | None = 65532
    """The image's ``sluice`` user; None leaves it to the image (it must still be non-root)."""
