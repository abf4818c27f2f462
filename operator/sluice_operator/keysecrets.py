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
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sluice_core.grants import MAX_KEY_ID, StoredGrant
from sluice_core.keyschema import hash_api_key
from sluice_core.model import CompiledPolicy, KeyGrant, Limit
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


@dataclass(frozen=True, slots=True)
class SecretKey:
    """What the operator keeps of one key Secret: never the key (its SHA-256, 32 bytes), never
    the Secret's data or body. What a grant needs is here, so that a policy's Secrets can be
    judged again (a tier renamed, the policy created after them, Redis restored) without
    reading them again; everything else is dropped at once."""

    key_id: str  # "<namespace>/<secret name>": the grant's key id, and how status names it
    policy: str  # the label's value: the policy (name) the key is for
    digest: bytes | None = None  # raw SHA-256 of data.key; None: no usable key (problem says why)
    tier: str | None = None
    limit: Limit | None = None
    expires_ms: int = 0  # unix ms; 0: never
    disabled: bool = False
    problem: str | None = None  # what makes the Secret unusable whatever the policy

    @property
    def secret(self) -> str:
        return self.key_id.split("/", 1)[-1]


def read_secret(body: Mapping[str, Any], label: str) -> SecretKey | None:
    """The Secret's key as :class:`SecretKey` (None: it has no ``label``, or is being deleted)."""
    meta = body.get("metadata", {})
    policy = (meta.get("labels") or {}).get(label)
    if not policy or meta.get("deletionTimestamp"):
        return None
    key_id = f"{meta.get('namespace') or ''}/{meta.get('name') or '?'}"
    if len(key_id) > MAX_KEY_ID:
        return SecretKey(key_id[:MAX_KEY_ID], policy, problem=f"namespace/name is longer than {MAX_KEY_ID} "
                         "characters (a grant's key id)")
    data = body.get("data") or {}
    policy = sys.intern(str(policy))  # thousands of Secrets name a few policies and tiers
    if (_field(data, "disabled") or "").strip().lower() == "true":
        return SecretKey(key_id, policy, disabled=True)
    key, tier = _field(data, "key"), _field(data, "tier")
    if not key:
        return SecretKey(key_id, policy, problem="data.key is missing or not valid base64 UTF-8")
    digest = bytes.fromhex(hash_api_key(key))
    tier = sys.intern(tier) if tier is not None else None
    expires_ms = 0
    expires = _field(data, "expiresAt")
    if expires:
        try:
            at = dt.datetime.fromisoformat(expires.strip().replace("Z", "+00:00"))
        except ValueError:
            return SecretKey(key_id, policy, digest, tier,
                             problem=f"data.expiresAt must be an RFC 3339 time, got {expires!r}")
        if at.tzinfo is None:
            at = at.replace(tzinfo=dt.UTC)
        expires_ms = max(int(at.timestamp() * 1000), 1)
    limit = None
    limit_text = _field(data, "limit")
    if limit_text:
        try:
            limit = parse_limit_text(limit_text)
        except ValueError as exc:
            return SecretKey(key_id, policy, digest, tier, expires_ms=expires_ms, problem=f"data.limit: {exc}")
    return SecretKey(key_id, policy, digest, tier, limit, expires_ms)


def judge(key: SecretKey, policy: CompiledPolicy, now_ms: int) -> tuple[StoredGrant | None, str | None]:
    """The grant the key gets under ``policy`` now (None: none), or why it cannot have one."""
    if key.disabled:
        return None, None
    if key.problem or key.digest is None:
        return None, key.problem or "data.key is missing"
    if key.tier not in policy.tiers:
        return None, (f"data.tier must name a tier of policy {policy.name} "
                      f"({', '.join(policy.tiers)}), got {key.tier!r}")
    if key.expires_ms and key.expires_ms <= now_ms:
        return None, None
    # key_id in the KeyGrant too: a document that embeds keys names them, as the grants do
    return StoredGrant(KeyGrant(tier=key.tier, limit=key.limit, key_id=key.key_id), key.key_id, key.expires_ms), None


def grants_for(policy: CompiledPolicy, secrets: Iterable[Mapping[str, Any]], *,
               now: dt.datetime | None = None) -> tuple[dict[str, KeyGrant], list[KeyProblem], dt.datetime | None]:
    """The policy's live grants (hex digest -> grant), the Secrets that could not be used (never
    echoing a key), and the soonest future expiry: what a document that embeds keys holds."""
    now = now or dt.datetime.now(dt.UTC)
    keys = (read_secret(s, label_for(policy)) for s in secrets)
    return embedded_grants(policy, [k for k in keys if k is not None], int(now.timestamp() * 1000))


def embedded_grants(policy: CompiledPolicy, keys: Iterable[SecretKey], now_ms: int
                    ) -> tuple[dict[str, KeyGrant], list[KeyProblem], dt.datetime | None]:
    """:func:`grants_for` of keys already read."""
    grants: dict[str, KeyGrant] = {}
    problems: list[KeyProblem] = []
    first = 0
    for key in keys:
        if key.policy != policy.name:
            continue
        stored, problem = judge(key, policy, now_ms)
        if problem:
            problems.append(KeyProblem(key.secret, problem))
        if stored is None or key.digest is None:
            continue
        grants[key.digest.hex()] = stored.grant
        if stored.expires_ms and (not first or stored.expires_ms < first):
            first = stored.expires_ms
    return grants, problems, dt.datetime.fromtimestamp(first / 1000, dt.UTC) if first else None
