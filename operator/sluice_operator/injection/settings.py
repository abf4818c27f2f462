"""What the injected sidecar container looks like: the operator's ``--sidecar-*`` flags.

Every flag also reads ``SLUICE_OPERATOR_<FLAG>`` (``--sidecar-port`` ->
``SLUICE_OPERATOR_SIDECAR_PORT``); the command line wins, and an empty value means the default.
The sidecar's own settings the injector passes on (timeouts, breaker, log level, grant cache,
usage analytics, client limits) take their help, check and environment variable from the sidecar's schema in the
core (``sluice_core.sidecar_settings``); left unset, no variable is written and the sidecar's
default applies. A bad value stops the operator at start with ``sluice operator: --flag:
reason``, rather than letting it inject containers the API server refuses.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from sluice_core import settingsform
from sluice_core.settingsform import Doc, SettingError, documented, setting, settings_form
from sluice_core.sidecar_settings import SidecarSettings

from sluice_operator.injection import values

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TUNED = ("redis_timeout_ms", "redis_connect_timeout_ms", "breaker_threshold", "breaker_cooldown_s",
         "log_level", "grant_cache_size", "grant_cache_max_age_s", "max_key_resolves",
         "usage", "usage_window_s", "usage_max_clients", "usage_max_endpoints", "usage_stream_maxlen",
         "usage_retries")
"""Sidecar settings with a field of their own here (passed as the sidecar's variables)."""
CLIENT_LIMITS = ("max_request_header_bytes", "max_headers", "header_timeout_s", "keepalive_timeout_s",
                 "client_timeout_s", "max_connections", "max_connections_per_client",
                 "max_inflight_requests")
"""The sidecar's client-side limits (they bound its memory under hostile clients), one flag
each, gathered in ``client_limits``."""
_SIDECAR = {f.field: f for f in settingsform.flags(SidecarSettings)}
SIDECAR_REDIS_ENV = _SIDECAR["redis"].env
"""The sidecar's Redis URL variable (``SLUICE_REDIS``), filled from ``--sidecar-redis-secret``."""
_DEFAULT_RESOURCES = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "128Mi"},  # no CPU limit: throttling would add latency to every request
}


def _tuning(name: str, *, passed: bool = False, fold_case: bool = False, chart: str | None = None) -> Doc:
    """The Doc of the sidecar setting ``name`` as an injector flag. ``passed``: the injector
    writes the sidecar's default itself (the flag shows it), else unset means the sidecar's.
    ``chart``: its value's name under ``sidecar.`` (default: the setting's name in camelCase)."""
    sidecar = _SIDECAR[name]
    if chart is None:
        chart = "".join(w.capitalize() for w in name.removesuffix("_s").split("_"))
        chart += "Seconds" if name.endswith("_s") else ""
    return Doc(help=f"the sidecar's `{sidecar.env}`: {sidecar.doc.help}", kind=sidecar.kind,
               positive=sidecar.doc.positive, choices=sidecar.doc.choices, fold_case=fold_case,
               shown=None if passed else f"the sidecar's, {sidecar.default}",
               metavar="SECONDS" if name.endswith("_s") else "MS" if name.endswith("_ms")
               else "LEVEL" if name == "log_level" else "MODE" if sidecar.doc.choices else "N",
               chart="sidecar." + chart[0].lower() + chart[1:])


def _tuned(name: str, *, passed: bool = False, fold_case: bool = False, chart: str | None = None) -> Any:
    return documented(_tuning(name, passed=passed, fold_case=fold_case, chart=chart),
                      default=_SIDECAR[name].default if passed else None)


def _extra_env(items: Sequence[str]) -> dict[str, str]:
    return values.env_entries(items, RESERVED_ENV)


@settings_form(flag_prefix="sidecar-", env_prefix="SLUICE_OPERATOR_")
class InjectionSettings:
    """What the injected sidecar container looks like (the operator's settings).

    Every sidecar flag also reads ``SLUICE_<FLAG>``; the tuning fields below are passed as
    those environment variables, the wiring (upstream, listen addresses, namespace, pod
    name and labels, Redis) as arguments.
    """

    image: str = setting(default="sluice:0.1.0", help="image of the injected sidecar (the project's one image; "
                                         "its entrypoint is `sluice`)", metavar="IMAGE", chart="sidecar.image")
    image_pull_policy: str = setting(default="IfNotPresent", help="imagePullPolicy of the sidecar: `Always`, "
                                                     "`IfNotPresent` or `Never`",
                                     choices=PULL_POLICIES, metavar="POLICY", chart="sidecar.imagePullPolicy")
    redis_url: str | None = setting(
        default="redis://redis.sluice-system:6379",
        help="Redis URL given to injected sidecars as `--redis` (written into their pod specs)",
        flag="redis", parse=values.redis_url, shown="`--redis`", metavar="URL", chart="sidecar.redisUrl")
    redis_url_secret: tuple[str, str] | None = setting(
        default=None, help="injected sidecars read their Redis URL (`SLUICE_REDIS`) from key KEY of Secret NAME "
              "in their own namespace, so a password never appears in a pod spec; takes precedence "
              "over `--sidecar-redis`. The chart requires this, or an explicit `sidecar.redisUrl`, "
              "when `externalRedis.existingSecret` is set",
        flag="redis-secret", parse=values.secret_key_ref, metavar="NAME/KEY", chart="sidecar.redisSecret")
    redis_ca_file: str | None = setting(
        default=None, help="CA bundle (PEM) of a `rediss://` Redis with a private CA, as the operator has it "
              "mounted: copied into ConfigMap `sluice-redis-ca` of each namespace a sidecar is injected "
              "into (when the pod is admitted), mounted into the sidecar and named by its "
              "`SLUICE_REDIS_CA_FILE`", shown="none: the image's CAs", metavar="PATH",
        chart="externalRedis.tls.caSecret")
    resources: Mapping[str, Any] = setting(
        default_factory=lambda: {k: dict(v) for k, v in _DEFAULT_RESOURCES.items()},
        help="the container's resources: a JSON object with `requests` and/or `limits`, each mapping "
             "a resource name to a quantity string (`100m`, `64Mi`, `1G`), no request above its "
             "limit, e.g. `{\"requests\":{\"cpu\":\"100m\",\"memory\":\"64Mi\"},\"limits\":"
             "{\"memory\":\"128Mi\"}}`. No CPU limit by default: throttling would add latency to "
             "every request. `{}`: none",
        parse=values.resources, shown=f"`{values.resources_json(_DEFAULT_RESOURCES)}`", metavar="JSON",
        chart="sidecar.resources")
    redis_timeout_ms: int | None = _tuned("redis_timeout_ms", passed=True)
    redis_connect_timeout_ms: int | None = _tuned("redis_connect_timeout_ms")
    breaker_threshold: int | None = _tuned("breaker_threshold")
    breaker_cooldown_s: float | None = _tuned("breaker_cooldown_s")
    log_level: str | None = _tuned("log_level", fold_case=True)
    grant_cache_size: int | None = _tuned("grant_cache_size")
    grant_cache_max_age_s: float | None = _tuned("grant_cache_max_age_s")
    max_key_resolves: int | None = _tuned("max_key_resolves")
    usage: str | None = _tuned("usage", chart="Usage.mode")
    usage_window_s: float | None = _tuned("usage_window_s", chart="Usage.windowSeconds")
    usage_max_clients: int | None = _tuned("usage_max_clients", chart="Usage.maxClients")
    usage_max_endpoints: int | None = _tuned("usage_max_endpoints", chart="Usage.maxEndpoints")
    usage_stream_maxlen: int | None = _tuned("usage_stream_maxlen", chart="Usage.streamMaxLen")
    usage_retries: int | None = _tuned("usage_retries", chart="Usage.retries")
    client_limits: Mapping[str, int | float] = setting(
        default_factory=dict, help="the sidecar's client-side limits by setting name",
        parts=tuple((name, _tuning(name)) for name in CLIENT_LIMITS))
    """The sidecar's client-side limits by setting name (``max_connections`` ->
    ``SLUICE_MAX_CONNECTIONS``); one left out keeps the sidecar's default."""
    sidecar_port: int = setting(
        default=15080, help="port the sidecar listens on for client traffic (the next free one above it when a "
               "container already uses it; the pod annotation `sluice.dev/sidecar-port` overrides it)",
        flag="port", parse=values.port, kind=str, metavar="PORT", chart="sidecar.port")
    admin_port: int = setting(
        default=15090, help="port of the sidecar's `/metrics`, `/healthz`, `/readyz` (the next free one above it "
               "when taken)", parse=values.port, kind=str, metavar="PORT", chart="sidecar.adminPort")
    default_port_name: str = setting(
        default="http", help="the app's named port the sidecar takes over when the pod has no `sluice.dev/port` "
                "annotation", parse=values.port_name, metavar="NAME", chart="sidecar.defaultPortName")
    run_as_user: int | None = setting(
        default=65532, help="runAsUser and runAsGroup of the sidecar (not 0; the image's `sluice` user by "
               f"default); `{values.RUN_AS_IMAGE}`: leave them to the image (its user must not be root)",
        parse=values.run_as_user, kind=str, metavar="UID", chart="sidecar.runAsUser")
    extra_env: Mapping[str, str] = setting(
        default_factory=dict,
        help="one more environment variable for the sidecar (repeatable; the flags replace the env "
             "var's list). Refused: the ones the injector sets, the standalone-mode files (an "
             "injected sidecar runs in cluster mode) and the ones with a flag above",
        flag="env", parse=_extra_env, repeatable=True,
        metavar="NAME=VALUE", chart="sidecar.env")

    native_sidecar: bool = False
    """Inject the sidecar as a native sidecar (an init container with ``restartPolicy:
    Always``: started before the app, stopped after it) rather than as one more container.
    Not a flag: the operator sets it from the API server's version when it starts its webhooks
    (:func:`sluice_operator.webhooks.native_sidecars`; on by default from Kubernetes 1.29)."""

    def sidecar_env(self) -> dict[str, str]:
        """The sidecar's variables these settings write into the container (unset: none)."""
        tuning: dict[str, Any] = {name: getattr(self, name) for name in TUNED}
        tuning.update(self.client_limits)
        return {_SIDECAR[name].env: str(value) for name, value in tuning.items() if value is not None}


def _reserved() -> dict[str, str]:
    """Environment variables of the sidecar that the injector sets itself: not for --sidecar-env."""
    flag = {f.key or f.field: f.name for f in settingsform.flags(InjectionSettings)}
    env = {name: f.env for name, f in _SIDECAR.items()}
    injector = "it is set by the injector"
    cluster_mode = "an injected sidecar runs in cluster mode"
    return {
        "POD_NAME": f"{injector} (the pod's name, downward API)",
        "POD_NAMESPACE": f"{injector} (the pod's namespace, downward API)",
        env["redis"]: f"use {flag['redis_url']} or {flag['redis_url_secret']}",
        env["redis_ca_file"]: f"use {flag['redis_ca_file']}",
        env["upstream"]: f"{injector} (the app container's port)",
        env["listen"]: f"use {flag['sidecar_port']}",
        env["admin_listen"]: f"use {flag['admin_port']}",
        env["namespace"]: f"{injector} (the pod's namespace)",
        env["pod_labels"]: f"{injector} (the downward-API labels file)",
        env["pod_name"]: f"{injector} (the pod's name)",
        env["drain_token"]: f"{injector} (a random token per pod, also in the app's preStop hook)",
        env["without_config"]: f"{injector} (per pod, from the failure mode of the policies selecting it)",
        **{env[name]: f"use {flag[name]}" for name in (*TUNED, *CLIENT_LIMITS)},
        env["policy_file"]: f"{cluster_mode} (its namespace's config from Redis)",
        env["api_keys_file"]: f"{cluster_mode} (API keys from key Secrets)",
    }


RESERVED_ENV: dict[str, str] = _reserved()


def from_args(args: argparse.Namespace, redis_url: str | None) -> InjectionSettings:
    """The ``--sidecar-*`` flags of ``args`` checked (SettingError naming the first bad one);
    ``redis_url`` (the operator's ``--redis``) unless ``--sidecar-redis`` is given."""
    s = settingsform.load(InjectionSettings, args, settingsform.EXPECTED, redis_url=redis_url)
    if s.sidecar_port == s.admin_port:
        raise SettingError(settingsform.flag_name(InjectionSettings, "admin_port"),
                           f"must differ from {settingsform.flag_name(InjectionSettings, 'sidecar_port')} "
                           f"({s.sidecar_port})", settingsform.EXPECTED)
    return s
