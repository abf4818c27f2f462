"""The operator flags that shape the injected sidecar container (``--sidecar-*``).

Every flag also reads ``SLUICE_OPERATOR_<FLAG>`` (``--sidecar-port`` ->
``SLUICE_OPERATOR_SIDECAR_PORT``); the command line wins, and an empty value means the
flag's default. :func:`add_arguments` only stores the text; :func:`injection_settings` checks
every value and builds the :class:`InjectionSettings` the mutating webhook uses. A bad value
stops the operator at start with ``sluice operator: --flag: reason``, rather than letting it
inject containers the API server refuses (e.g. a request above its limit fails every pod).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from decimal import Decimal
from typing import Any, NoReturn

from sluice_core.redisurl import parse_redis_url

from sluice_operator.injection.settings import MAX_PORT_NAME, PORT_NAME_RE, InjectionSettings

DEFAULTS = InjectionSettings()
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LOG_LEVELS = ("debug", "info", "warning", "error")
RUN_AS_IMAGE = "image"
"""``--sidecar-run-as-user image``: no runAsUser, the image's user (it must not be root)."""
RESOURCE_KEYS = ("requests", "limits")

# Kubernetes resource.Quantity, e.g. 50m, 64Mi, 1.5, 1e3, 2G.
_QUANTITY = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?")
_SUFFIXES = {"": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3,
             "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
             "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
             **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
# A resource name: cpu, memory, ephemeral-storage, hugepages-2Mi, nvidia.com/gpu, ...
_RESOURCE_NAME = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Kubernetes: a Secret's name is a DNS-1123 subdomain; a key in its data is [-._a-zA-Z0-9]+.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")

# The sidecar's client-side limits (they bound its memory under hostile clients): flag
# ``--sidecar-<name>`` -> setting ``<name>`` -> ``SLUICE_<NAME>``, its kind, the sidecar's default
# (quoted in the help; unset, the flag passes nothing and that default applies) and what it is.
CLIENT_LIMITS: tuple[tuple[str, type[int] | type[float], str, str], ...] = (
    ("max-request-header-bytes", int, "16384",
     "largest request head, request line and all header fields (431 past it)"),
    ("max-headers", int, "100", "most header fields in one request (431 past it)"),
    ("header-timeout-s", float, "10.0",
     "seconds a new connection has for its first request head, and each later head once begun"),
    ("keepalive-timeout-s", float, "75.0", "seconds an idle keep-alive client connection is kept"),
    ("client-timeout-s", float, "30.0",
     "seconds a client may take no response byte (then aborted) or send no body byte (then 408)"),
    ("max-connections", int, "1024", "open client connections at most (503 past it)"),
    ("max-connections-per-client", int, "256",
     "open connections from one client address (IPv6: its /64) at most, trusted proxies exempt "
     "(503 past it)"),
    ("max-inflight-requests", int, "256",
     "requests being decided or proxied at once at most (503 past it)"),
)


def limit_env(name: str) -> str:
    """``max-connections`` -> ``SLUICE_MAX_CONNECTIONS`` (the sidecar's env var)."""
    return "SLUICE_" + name.replace("-", "_").upper()


# Environment variables of the sidecar that the injector sets itself: not for --sidecar-env.
RESERVED_ENV: dict[str, str] = {
    "POD_NAME": "it is set by the injector (the pod's name, downward API)",
    "POD_NAMESPACE": "it is set by the injector (the pod's namespace, downward API)",
    "SLUICE_REDIS": "use --sidecar-redis or --sidecar-redis-secret",
    "SLUICE_UPSTREAM": "it is set by the injector (the app container's port)",
    "SLUICE_LISTEN": "use --sidecar-port",
    "SLUICE_ADMIN_LISTEN": "use --sidecar-admin-port",
    "SLUICE_NAMESPACE": "it is set by the injector (the pod's namespace)",
    "SLUICE_POD_LABELS": "it is set by the injector (the downward-API labels file)",
    "SLUICE_POD_NAME": "it is set by the injector (the pod's name)",
    "SLUICE_REDIS_TIMEOUT_MS": "use --sidecar-redis-timeout-ms",
    "SLUICE_REDIS_CONNECT_TIMEOUT_MS": "use --sidecar-redis-connect-timeout-ms",
    "SLUICE_BREAKER_THRESHOLD": "use --sidecar-breaker-threshold",
    "SLUICE_BREAKER_COOLDOWN_S": "use --sidecar-breaker-cooldown-s",
    "SLUICE_LOG_LEVEL": "use --sidecar-log-level",
    **{limit_env(name): f"use --sidecar-{name}" for name, *_ in CLIENT_LIMITS},
    "SLUICE_POLICY_FILE": "an injected sidecar runs in cluster mode (its namespace's config from Redis)",
    "SLUICE_API_KEYS_FILE": "an injected sidecar runs in cluster mode (API keys from key Secrets)",
}


def env_name(flag: str) -> str:
    """``--sidecar-port`` -> ``SLUICE_OPERATOR_SIDECAR_PORT``."""
    return "SLUICE_OPERATOR_" + flag.lstrip("-").replace("-", "_").upper()


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def add_arguments(group: argparse._ActionsContainer) -> None:
    """The ``--sidecar-*`` flags; values stay text until :func:`injection_settings`."""

    def flag(name: str, default: str | None, help_text: str, shown: str | None = None,
             metavar: str | None = None) -> None:
        env = env_name(name)
        group.add_argument(name, default=os.environ.get(env, default), metavar=metavar,
                           help=f"{help_text} [env {env}] (default: {shown or default})")

    d = DEFAULTS
    flag("--sidecar-image", d.image, "image of the injected sidecar", metavar="IMAGE")
    flag("--sidecar-image-pull-policy", d.image_pull_policy,
         "imagePullPolicy of the sidecar: " + ", ".join(PULL_POLICIES), metavar="POLICY")
    flag("--sidecar-redis", None, "Redis URL given to injected sidecars (written into their pod specs)",
         shown="--redis", metavar="URL")
    flag("--sidecar-redis-secret", None,
         "injected sidecars read their Redis URL from key KEY of Secret NAME in their own "
         "namespace, so a password never appears in a pod spec; takes precedence over "
         "--sidecar-redis", shown="unset", metavar="NAME/KEY")
    flag("--sidecar-resources", json.dumps(dict(d.resources), separators=(",", ":")),
         "the sidecar's resources: a JSON object with 'requests' and/or 'limits', each mapping a "
         "resource name to a quantity string, e.g. "
         "'{\"requests\":{\"cpu\":\"100m\",\"memory\":\"64Mi\"},\"limits\":{\"memory\":\"128Mi\"}}'; "
         "'{}' sets none", metavar="JSON")
    flag("--sidecar-redis-timeout-ms", _text(d.redis_timeout_ms),
         "SLUICE_REDIS_TIMEOUT_MS of the sidecar: give up on a Redis decision after this long "
         "(then the policy's failure mode applies)", metavar="MS")
    flag("--sidecar-redis-connect-timeout-ms", _text(d.redis_connect_timeout_ms),
         "SLUICE_REDIS_CONNECT_TIMEOUT_MS of the sidecar", shown="the sidecar's, 500", metavar="MS")
    flag("--sidecar-breaker-threshold", _text(d.breaker_threshold),
         "SLUICE_BREAKER_THRESHOLD of the sidecar: consecutive Redis failures that open its "
         "circuit breaker", shown="the sidecar's, 5", metavar="N")
    flag("--sidecar-breaker-cooldown-s", _text(d.breaker_cooldown_s),
         "SLUICE_BREAKER_COOLDOWN_S of the sidecar: seconds after the breaker opens before it "
         "probes Redis in the background; then every 0.1 s while Redis is unreachable or slow, "
         "once per cooldown while it answers with an error (a wrong password)",
         shown="the sidecar's, 2.0", metavar="SECONDS")
    flag("--sidecar-log-level", _text(d.log_level),
         "SLUICE_LOG_LEVEL of the sidecar: " + ", ".join(LOG_LEVELS),
         shown="the sidecar's, info", metavar="LEVEL")
    for name, _, default, what in CLIENT_LIMITS:
        flag(f"--sidecar-{name}", None, f"{limit_env(name)} of the sidecar: {what}",
             shown=f"the sidecar's, {default}", metavar="SECONDS" if name.endswith("-s") else "N")
    flag("--sidecar-port", str(d.sidecar_port),
         "port the sidecar listens on for client traffic (the next free one above it when a "
         "container already uses it; the pod annotation sluice.dev/sidecar-port overrides it)",
         metavar="PORT")
    flag("--sidecar-admin-port", str(d.admin_port),
         "port of the sidecar's /metrics, /healthz, /readyz (the next free one above it when taken)",
         metavar="PORT")
    flag("--sidecar-default-port-name", d.default_port_name,
         "the app's named port the sidecar takes over when the pod has no sluice.dev/port "
         "annotation", metavar="NAME")
    flag("--sidecar-run-as-user", _text(d.run_as_user),
         f"runAsUser and runAsGroup of the sidecar; '{RUN_AS_IMAGE}': leave them to the image "
         "(its user must not be root)", metavar="UID")
    env = env_name("--sidecar-env")
    group.add_argument("--sidecar-env", action="append", default=None, metavar="NAME=VALUE",
                       help="one more environment variable for the sidecar (repeatable; the flags "
                            "replace the env var's list); not the ones the injector sets or that "
                            f"have a flag of their own [env {env}, one NAME=VALUE per line] "
                            "(default: none)")


def _fail(flag: str, reason: str) -> NoReturn:
    raise SystemExit(f"sluice operator: {flag}: {reason}")


def _given(args: argparse.Namespace, flag: str) -> str | None:
    """The flag's text; None when unset or empty (then the default applies)."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return (value.strip() or None) if isinstance(value, str) else None


def _number(args: argparse.Namespace, flag: str, kind: type[int] | type[float]
            ) -> int | float | None:
    text = _given(args, flag)
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        _fail(flag, f"expected a positive {'integer' if kind is int else 'number'}, got {text!r}")
    if not (math.isfinite(value) and value > 0):
        _fail(flag, f"must be greater than 0, got {text}")
    return value


def _port(args: argparse.Namespace, flag: str, default: int) -> int:
    text = _given(args, flag)
    if text is None:
        return default
    if not text.isdigit() or not 0 < int(text) < 65536:
        _fail(flag, f"expected a port number 1..65535, got {text!r}")
    return int(text)


def _choice(args: argparse.Namespace, flag: str, choices: tuple[str, ...], default: str | None,
            fold: bool = False) -> str | None:
    text = _given(args, flag)
    if text is None:
        return default
    value = text.lower() if fold else text
    if value not in choices:
        _fail(flag, f"expected one of {', '.join(choices)}, got {text!r}")
    return value


def quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity string (``50m`` -> 0.05, ``64Mi`` -> 67108864)."""
    if not _QUANTITY.fullmatch(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)")
    body = text.rstrip("KMGTPEikm")
    suffix = text[len(body):]
    return Decimal(body) * _SUFFIXES[suffix]


def parse_resources(text: str) -> dict[str, dict[str, str]]:
    """A ResourceRequirements as JSON: ``requests``/``limits`` of quantity strings, no request
    above its limit. Raises ValueError with the reason."""
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object with requests and/or limits, got {text!r}")
    unknown = sorted(set(doc) - set(RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (only requests and limits)")
    values: dict[str, dict[str, Decimal]] = {}
    for key in RESOURCE_KEYS:
        if key not in doc:
            continue
        amounts = doc[key]
        if not isinstance(amounts, dict):
            raise ValueError(f"{key}: expected an object of resource name -> quantity")
        values[key] = {}
        for name, amount in amounts.items():
            if not _RESOURCE_NAME.fullmatch(name) or len(name) > 253:
                raise ValueError(f"{key}: {name!r} is not a resource name")
            if not isinstance(amount, str):
                raise ValueError(f"{key}.{name}: expected a quantity string such as "
                                 f"\"100m\" or \"64Mi\", got {json.dumps(amount)}")
            try:
                value = quantity(amount)
            except ValueError as exc:
                raise ValueError(f"{key}.{name}: {exc}") from None
            if value < 0:
                raise ValueError(f"{key}.{name}: must not be negative, got {amount!r}")
            values[key][name] = value
    for name, request in values.get("requests", {}).items():
        limit = values.get("limits", {}).get(name)
        if limit is not None and request > limit:
            raise ValueError(f"requests.{name} ({doc['requests'][name]}) is above "
                             f"limits.{name} ({doc['limits'][name]}): the API server would "
                             "refuse every injected pod")
    return {key: dict(doc[key]) for key in RESOURCE_KEYS if doc.get(key)}  # no empty maps


def _resources(args: argparse.Namespace) -> dict[str, dict[str, str]] | None:
    text = _given(args, "--sidecar-resources")
    if text is None:
        return None
    try:
        return parse_resources(text)
    except ValueError as exc:
        _fail("--sidecar-resources", str(exc))


def _run_as_user(args: argparse.Namespace) -> int | None:
    flag = "--sidecar-run-as-user"
    text = _given(args, flag)
    if text is None:
        return DEFAULTS.run_as_user
    if text == RUN_AS_IMAGE:
        return None
    if not text.isdigit() or int(text) >= 2**31:
        _fail(flag, f"expected a user id or {RUN_AS_IMAGE!r}, got {text!r}")
    if int(text) == 0:
        _fail(flag, "0 is root; the sidecar runs as non-root (runAsNonRoot)")
    return int(text)


def _extra_env(args: argparse.Namespace) -> dict[str, str]:
    flag = "--sidecar-env"
    items: list[str] | None = args.sidecar_env
    if items is None:
        items = os.environ.get(env_name(flag), "").splitlines()
    env: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            _fail(flag, f"expected NAME=VALUE, got {item!r}")
        if not _ENV_NAME.fullmatch(name):
            _fail(flag, f"{name!r} is not an environment variable name (letters, digits, _; "
                        "not starting with a digit)")
        if name in RESERVED_ENV:
            _fail(flag, f"{name} cannot be set here: {RESERVED_ENV[name]}")
        if name in env:
            _fail(flag, f"{name} is given twice")
        env[name] = value
    return env


def _secret_key_ref(ref: str | None) -> tuple[str, str] | None:
    """``NAME/KEY`` of --sidecar-redis-secret, checked as the API server checks a pod's
    secretKeyRef (else it would refuse every injected pod)."""
    if not ref:
        return None
    name, sep, key = ref.partition("/")
    if not (sep and name and key):
        _fail("--sidecar-redis-secret", f"expected NAME/KEY, got {ref!r}")
    if len(name) > 253 or not _SECRET_NAME.fullmatch(name):
        _fail("--sidecar-redis-secret", f"{name!r} is not a Secret name (lowercase letters, digits, "
                                        "'-' and '.', starting and ending with a letter or digit)")
    if len(key) > 253 or not _SECRET_KEY.fullmatch(key):
        _fail("--sidecar-redis-secret", f"{key!r} is not a Secret key (letters, digits, '-', '_', '.')")
    return name, key


def injection_settings(args: argparse.Namespace) -> InjectionSettings:
    """Check the ``--sidecar-*`` flags of ``args`` (and ``args.redis``, the fallback Redis URL);
    raises SystemExit("sluice operator: --flag: reason") on the first bad one."""
    d = DEFAULTS
    port = _port(args, "--sidecar-port", d.sidecar_port)
    admin_port = _port(args, "--sidecar-admin-port", d.admin_port)
    if port == admin_port:
        _fail("--sidecar-admin-port", f"must differ from --sidecar-port ({port})")
    port_name = _given(args, "--sidecar-default-port-name") or d.default_port_name
    if len(port_name) > MAX_PORT_NAME or not PORT_NAME_RE.fullmatch(port_name):
        _fail("--sidecar-default-port-name",
              f"{port_name!r} is not a port name (at most {MAX_PORT_NAME} lowercase letters, "
              "digits and '-', with a letter)")
    timeout = _number(args, "--sidecar-redis-timeout-ms", int)
    connect_timeout = _number(args, "--sidecar-redis-connect-timeout-ms", int)
    threshold = _number(args, "--sidecar-breaker-threshold", int)
    cooldown = _number(args, "--sidecar-breaker-cooldown-s", float)
    resources = _resources(args)
    sidecar_redis = _given(args, "--sidecar-redis")
    if sidecar_redis:  # injected sidecars would crash-loop on it; never echo it (a password)
        try:
            parse_redis_url(sidecar_redis)
        except ValueError as exc:
            _fail("--sidecar-redis", str(exc))
    limits = {name.replace("-", "_"): _number(args, f"--sidecar-{name}", kind)
              for name, kind, *_ in CLIENT_LIMITS}
    return InjectionSettings(
        image=_given(args, "--sidecar-image") or d.image,
        image_pull_policy=_choice(args, "--sidecar-image-pull-policy", PULL_POLICIES,
                                  d.image_pull_policy) or d.image_pull_policy,
        redis_url=sidecar_redis or args.redis,
        redis_url_secret=_secret_key_ref(_given(args, "--sidecar-redis-secret")),
        redis_timeout_ms=int(timeout) if timeout is not None else d.redis_timeout_ms,
        redis_connect_timeout_ms=int(connect_timeout) if connect_timeout is not None
        else d.redis_connect_timeout_ms,
        breaker_threshold=int(threshold) if threshold is not None else d.breaker_threshold,
        breaker_cooldown_s=float(cooldown) if cooldown is not None else d.breaker_cooldown_s,
        log_level=_choice(args, "--sidecar-log-level", LOG_LEVELS, d.log_level, fold=True),
        client_limits={name: value for name, value in limits.items() if value is not None},
        extra_env=_extra_env(args),
        sidecar_port=port,
        admin_port=admin_port,
        default_port_name=port_name,
        resources=resources if resources is not None else d.resources,
        run_as_user=_run_as_user(args),
    )
