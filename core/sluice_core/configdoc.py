"""The per-namespace config document: what the operator (or ``sluice apply``) writes to Redis
and every sidecar of that namespace reads.

Shape (JSON, ``schema`` 1)::

    {"schema": 1, "namespace": "shop",
     "policies": [<normalized RateLimitPolicy manifest>, ...],
     "apiKeys": {"<policy name>": {"<sha256 hex>": {"tier": "pro", "limit": {...}?, "id": "..."?}}}}

An ``apiKeys`` entry's optional ``id`` names the key in usage reports (a Secret's name, a keys
file's ``id``); without it the sidecar reports a short digest (:func:`grants.default_key_id`).

``apiKeys`` embeds a policy's keys (the operator's key Secrets, and documents written by
an earlier ``sluice apply``). ``sluice apply`` now writes ``"apiKeys": {}`` and the keys as
grants in Redis (:mod:`sluice_core.keysapply`), so the document's size does not grow with them;
the document is still read with its embedded keys (schema 1 unchanged).

The cluster document (namespace ``_cluster``) holds the ClusterRateLimitPolicies and, since a
sidecar cannot read namespace labels, the namespaces each one's ``namespaceSelector`` resolved
to when the operator wrote it: ``"namespaces": {"<policy name>": ["shop", "billing"]}``.

A *placeholder* (``"placeholder": true``, no policies) is what Sluice writes where there is no
document at all, never over one (``scripts/publish_config.lua`` with ``missing``): the cluster document always
exists once the operator or ``sluice apply`` ran, so a sidecar whose namespace has no document
knows Redis is initialised and no namespace policy exists. A sidecar that already holds a config
from that document keeps it (a placeholder after Redis lost everything says nothing new).

The version lives beside the document in the same Redis hash, assigned atomically when it is
written (see ``scripts/publish_config.lua``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.grants import MAX_KEY_ID, valid_key_id
from sluice_core.manifest import limit_to_dict, to_manifest
from sluice_core.model import CompiledPolicy, KeyGrant
from sluice_core.parse import DocumentChecker, parse_limit, parse_policy

SCHEMA = 1


@dataclass(frozen=True)
class NamespaceConfig:
    namespace: str
    version: int
    policies: tuple[CompiledPolicy, ...]
    grants: Mapping[str, Mapping[str, KeyGrant]] = field(default_factory=dict)  # policy -> digest -> grant
    scopes: Mapping[str, frozenset[str]] = field(default_factory=dict)  # cluster policy -> namespaces
    placeholder: bool = False  # written where there was no document: no policy, nothing lost


def build_doc(namespace: str, policies: list[CompiledPolicy],
              grants: Mapping[str, Mapping[str, KeyGrant]] | None = None,
              scopes: Mapping[str, Iterable[str]] | None = None) -> str:
    keys: dict[str, dict[str, Any]] = {}
    for policy_name, table in (grants or {}).items():
        keys[policy_name] = {
            digest: {"tier": g.tier, **({"limit": limit_to_dict(g.limit)} if g.limit else {}),
                     **({"id": g.key_id} if g.key_id else {})}
            for digest, g in sorted(table.items())
        }
    doc = {
        "schema": SCHEMA,
        "namespace": namespace,
        "policies": [to_manifest(p) for p in sorted(policies, key=lambda p: p.name)],
        "apiKeys": keys,
    }
    if scopes is not None:
        doc["namespaces"] = {name: sorted(set(ns)) for name, ns in sorted(scopes.items())}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def placeholder_doc(namespace: str) -> str:
    """The document created where there is none (see the module docstring)."""
    doc = json.loads(build_doc(namespace, []))
    doc["placeholder"] = True
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def load_doc(text: str | bytes, version: int) -> NamespaceConfig:
    """Parse a stored document; raise :class:`PolicyErrors` if any part of it is unusable."""
    src = f"config v{version}"
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PolicyErrors([PolicyError("(document)", f"is not valid JSON: {exc}", src)]) from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else None
        raise PolicyErrors([PolicyError("schema", f"must be {SCHEMA}, got {got!r}", src)])
    namespace = str(doc.get("namespace", ""))
    policies = [parse_policy(m, source=src, default_namespace=namespace)
                for m in doc.get("policies") or []]
    by_name = {p.name: p for p in policies}
    c = DocumentChecker(src)
    grants: dict[str, dict[str, KeyGrant]] = {}
    for policy_name, table in (c.mapping(doc.get("apiKeys"), "apiKeys") or {}).items():
        policy = by_name.get(policy_name)
        if policy is None:
            c.fail(f"apiKeys.{policy_name}", "names no policy in this document")
            continue
        out: dict[str, KeyGrant] = {}
        for digest, g in (c.mapping(table, f"apiKeys.{policy_name}") or {}).items():
            p = f"apiKeys.{policy_name}.{digest[:12]}"
            if not isinstance(g, dict) or g.get("tier") not in policy.tiers:
                c.fail(f"{p}.tier", "must name a tier of the policy")
                continue
            limit = parse_limit(c, g["limit"], f"{p}.limit") if isinstance(g.get("limit"), dict) else None
            key_id = g.get("id", "")
            if key_id and not valid_key_id(key_id):
                c.fail(f"{p}.id", f"must be 1-{MAX_KEY_ID} printable ASCII characters without spaces")
                continue
            out[digest] = KeyGrant(tier=g["tier"], limit=limit, key_id=key_id)
        grants[policy_name] = out
    scopes: dict[str, frozenset[str]] = {}
    for policy_name, names in (c.mapping(doc.get("namespaces"), "namespaces") or {}).items():
        if policy_name not in by_name:
            c.fail(f"namespaces.{policy_name}", "names no policy in this document")
        elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            c.fail(f"namespaces.{policy_name}", "must be a list of namespace names")
        else:
            scopes[policy_name] = frozenset(names)
    if c.errors:
        raise PolicyErrors(c.errors)
    return NamespaceConfig(namespace=namespace, version=version, policies=tuple(policies),
                           grants=grants, scopes=scopes, placeholder=doc.get("placeholder") is True)
