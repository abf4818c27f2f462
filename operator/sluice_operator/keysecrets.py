"""API keys kept in Kubernetes Secrets, turned into the SHA-256 grants the sidecars read.

A key Secret is labelled ``sluice.dev/policy: <policy name>`` (in the policy's namespace) or
``sluice.dev/cluster-policy: <name>`` (for a ClusterRateLimitPolicy, in the operator's
cluster-keys namespace) and holds, in ``data``:

| field | required | meaning |
|---|---|---|
| ``key`` | yes | the API key itself (only its SHA-256 leaves the operator) |
| ``tier`` | yes | a tier of the policy |
| ``limit`` | no | this key's own bucket, ``"<requests>/<period>"`` or ``"<requests>/<period>/<burst>"`` |
| ``expiresAt`` | no | RFC 3339 time after which the key stops working |
| ``disabled`` | no | ``"true"`` revokes the key without deleting the Secret (the audit trail stays) |
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sluice_core.keyschema import hash_api_key
from sluice_core.model import CompiledPolicy, KeyGrant
from sluice_core.parse import parse_limit_text

POLICY_LABEL = "sluice.dev/policy"
CLUSTER_POLICY_LABEL = "sluice.dev/cluster-policy"
"""Keys of a ClusterRateLimitPolicy: Secrets so labelled, in the operator's cluster-keys namespace
only (anyone who may write Secrets in some namespace must not be able to grant cluster keys)."""


def label_for(policy: CompiledPolicy) -> str:
    return CLUSTER_POLICY_LABEL if policy.cluster_scoped else POLICY_LABEL


@dataclass(frozen=True)
class KeyProblem:
    secret: str
    reason: str


def _field(data: Mapping[str, Any], name: str) -> str | None:
    raw = data.get(name)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def grants_for(policy: CompiledPolicy, secrets: Iterable[Mapping[str, Any]], *,
               now: dt.datetime | None = None) -> tuple[dict[str, KeyGrant], list[KeyProblem], dt.datetime | None]:
    """The policy's live grants, the Secrets that could not be used (never echoing a key), and
    the soonest future expiry (when the grants must be rebuilt)."""
    now = now or dt.datetime.now(dt.UTC)
    grants: dict[str, KeyGrant] = {}
    problems: list[KeyProblem] = []
    next_expiry: dt.datetime | None = None
    label = label_for(policy)
    for secret in secrets:
        meta = secret.get("metadata", {})
        name = str(meta.get("name", "?"))
        if meta.get("labels", {}).get(label) != policy.name or meta.get("deletionTimestamp"):
            continue
        data = secret.get("data") or {}
        if (_field(data, "disabled") or "").strip().lower() == "true":
            continue
        key, tier = _field(data, "key"), _field(data, "tier")
        if not key:
            problems.append(KeyProblem(name, "data.key is missing or not valid base64 UTF-8"))
            continue
        if tier not in policy.tiers:
            problems.append(KeyProblem(name, f"data.tier must name a tier of policy {policy.name} "
                                             f"({', '.join(policy.tiers)}), got {tier!r}"))
            continue
        expires = _field(data, "expiresAt")
        if expires:
            try:
                at = dt.datetime.fromisoformat(expires.strip().replace("Z", "+00:00"))
            except ValueError:
                problems.append(KeyProblem(name, f"data.expiresAt must be an RFC 3339 time, got {expires!r}"))
                continue
            if at.tzinfo is None:
                at = at.replace(tzinfo=dt.UTC)
            if at <= now:
                continue
            next_expiry = at if next_expiry is None else min(next_expiry, at)
        limit = None
        limit_text = _field(data, "limit")
        if limit_text:
            try:
                limit = parse_limit_text(limit_text)
            except ValueError as exc:
                problems.append(KeyProblem(name, f"data.limit: {exc}"))
                continue
        grants[hash_api_key(key)] = KeyGrant(tier=tier, limit=limit)
    return grants, problems, next_expiry
