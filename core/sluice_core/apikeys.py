"""API keys → tiers. Keys are only ever held as SHA-256 hex digests.

In standalone mode the grants come from a YAML file (``--api-keys-file``)::

    keys:
      "sk_pro_4Jx...": pro                      # plaintext key -> tier
      "sha256:9f86d08...": {tier: enterprise}    # or its digest, so the file holds no secret
      "sk_free_7Qa...": {tier: free, limit: {requests: 10, period: 1m}}
      "sk_ent_9Zb...": {tier: pro, id: acme-prod, expiresAt: "2027-01-31T00:00:00Z"}

``id`` (the key's name in usage reports; a short digest when not given) and ``expiresAt`` are
read by ``sluice apply`` (:mod:`sluice_core.keysfile`); the sidecar's standalone mode refuses
``expiresAt`` (it would not enforce it) and reports the key's usage under its ``id``.

In a cluster the operator builds the same grants from Kubernetes Secrets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from sluice_core import yamltext
from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.grants import MAX_KEY_ID, valid_key_id
from sluice_core.keyschema import hash_api_key
from sluice_core.model import CompiledPolicy, KeyGrant
from sluice_core.parse import DocumentChecker, parse_limit

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
MAX_KEY_LENGTH = 512


def check_entry(c: DocumentChecker, p: str, raw_key: Any, value: Any, policy: CompiledPolicy, *,
                fields: frozenset[str] = frozenset()) -> tuple[str, KeyGrant, Mapping[str, Any]] | None:
    """One entry of a keys file (``p`` names it by index: never echo the key, the file may hold
    plaintext secrets): ``(sha256 hex, grant, the entry's fields)``, or None after recording
    why not in ``c``. ``fields``: what the caller reads besides ``tier`` and ``limit``."""
    if not isinstance(raw_key, str) or not raw_key or len(raw_key) > MAX_KEY_LENGTH:
        c.fail(p, f"key must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
        return None
    m = _DIGEST.fullmatch(raw_key)
    digest = m.group(1) if m else hash_api_key(raw_key)
    spec: Mapping[str, Any] = {"tier": value} if isinstance(value, str) else (c.mapping(value, p, required=True) or {})
    if "expiresAt" in spec and "expiresAt" not in fields:
        c.fail(f"{p}.expiresAt", "is not supported by the sidecar's --api-keys-file (standalone "
               "mode); sluice apply writes it to Redis")
    c.unknown(spec, p, {"tier", "limit", "expiresAt", *fields})
    tier = spec.get("tier")
    if tier not in policy.tiers:
        c.fail(f"{p}.tier", f"must name a tier of policy {policy.name} ({', '.join(policy.tiers)}), got {tier!r}")
        return None
    limit = None
    lm = c.mapping(spec.get("limit"), f"{p}.limit")
    if lm is not None:
        c.unknown(lm, f"{p}.limit", {"requests", "period", "burst"})
        limit = parse_limit(c, lm, f"{p}.limit")
        top_cost = max((r.cost for r in policy.rules if not r.skip), default=1)
        if limit is not None and limit.burst < top_cost:
            c.fail(f"{p}.limit.burst", f"is {limit.burst}, less than the cost {top_cost} of a "
                   "rule of the policy: that request could never pass")
    return digest, KeyGrant(tier=str(tier), limit=limit), spec


def parse_grants(doc: Any, policy: CompiledPolicy, *, source: str = "") -> dict[str, KeyGrant]:
    """Validate a keys document against the policy's tiers; return ``{sha256 hex: grant}``
    (the sidecar's standalone mode, which holds the whole file; ``sluice apply`` streams it:
    :mod:`sluice_core.keysfile`). An entry's ``id`` names the key in usage reports."""
    c = DocumentChecker(source)
    grants: dict[str, KeyGrant] = {}
    top = c.mapping(doc, "(keys file)", required=True)
    keys = c.mapping(top.get("keys") if top else None, "keys", required=True) if top else None
    for i, (raw_key, value) in enumerate((keys or {}).items()):
        p = f"keys[{i}]"
        entry = check_entry(c, p, raw_key, value, policy, fields=frozenset({"id"}))
        if entry is None:
            continue
        digest, grant, spec = entry
        if digest in grants:
            c.fail(p, "the same key is listed twice")
        key_id = spec.get("id", "")  # not given: the sidecar reports grants.default_key_id
        if key_id and not valid_key_id(key_id):
            c.fail(f"{p}.id", f"must be 1-{MAX_KEY_ID} printable ASCII characters without spaces")
        grants[digest] = replace(grant, key_id=str(key_id))
    if c.errors:
        raise PolicyErrors(c.errors)
    return grants


def load_grants_file(path: str | Path, policy: CompiledPolicy) -> dict[str, KeyGrant]:
    try:
        doc = yamltext.load(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise PolicyErrors([PolicyError("(keys file)", f"cannot be read: {exc.strerror}", str(path))]) from exc
    except yaml.YAMLError as exc:  # described without quoting the file: it may hold keys
        raise PolicyErrors([PolicyError("(keys file)", f"is not valid YAML: {yamltext.describe(exc)}",
                                        str(path))]) from None
    return parse_grants(doc, policy, source=str(path))
