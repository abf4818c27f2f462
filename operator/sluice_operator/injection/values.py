"""What a ``--sidecar-*`` value may be, checked as the API server would check the pod it ends
up in (a value it refuses would fail every injected pod): Kubernetes quantities and resource
requirements, ports and port names, user ids, Secret references, environment variable names.

Each parser takes the flag's text and returns the value or raises ValueError with the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sluice_core.redisurl import parse_redis_url

# Kubernetes' IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', at
# least one letter, no leading, trailing or doubled '-'.
PORT_NAME_RE = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*")
MAX_PORT_NAME = 15
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


def quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity string (``50m`` -> 0.05, ``64Mi`` -> 67108864)."""
    if not _QUANTITY.fullmatch(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)")
    body = text.rstrip("KMGTPEikm")
    suffix = text[len(body):]
    return Decimal(body) * _SUFFIXES[suffix]


def resources(text: str) -> dict[str, dict[str, str]]:
    """A ResourceRequirements as JSON: ``requests``/``limits`` of quantity strings, no request
    above its limit."""
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


def resources_json(value: Mapping[str, Any]) -> str:
    """How ``--sidecar-resources`` is written (its default, in the help and the README)."""
    return json.dumps(dict(value), separators=(",", ":"))


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"expected a port number 1..65535, got {text!r}")
    return int(text)


def port_name(text: str) -> str:
    if len(text) > MAX_PORT_NAME or not PORT_NAME_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a port name (at most {MAX_PORT_NAME} lowercase letters, "
                         "digits and '-', with a letter)")
    return text


def run_as_user(text: str) -> int | None:
    if text == RUN_AS_IMAGE:
        return None
    if not text.isdigit() or int(text) >= 2**31:
        raise ValueError(f"expected a user id or {RUN_AS_IMAGE!r}, got {text!r}")
    if int(text) == 0:
        raise ValueError("0 is root; the sidecar runs as non-root (runAsNonRoot)")
    return int(text)


def redis_url(text: str) -> str:
    """Injected sidecars would crash-loop on a bad URL; the reason never echoes it (a password)."""
    parse_redis_url(text)
    return text


def secret_key_ref(ref: str) -> tuple[str, str]:
    """``NAME/KEY``, checked as the API server checks a pod's secretKeyRef."""
    name, sep, key = ref.partition("/")
    if not (sep and name and key):
        raise ValueError(f"expected NAME/KEY, got {ref!r}")
    if len(name) > 253 or not _SECRET_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a Secret name (lowercase letters, digits, "
                         "'-' and '.', starting and ending with a letter or digit)")
    if len(key) > 253 or not _SECRET_KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a Secret key (letters, digits, '-', '_', '.')")
    return name, key


def env_entries(items: Sequence[str], reserved: Mapping[str, str]) -> dict[str, str]:
    """``NAME=VALUE`` entries (blank ones skipped); names in ``reserved`` are refused with the
    reason it gives."""
    env: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits, _; "
                             "not starting with a digit)")
        if name in reserved:
            raise ValueError(f"{name} cannot be set here: {reserved[name]}")
        if name in env:
            raise ValueError(f"{name} is given twice")
        env[name] = value
    return env
