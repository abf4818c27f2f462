"""The Redis key schema: every key Sluice reads or writes is spelled here and nowhere else.

Bucket keys carry one hash tag per decision, ``{<namespace>/<policy>:<client>}``, so the tier
bucket and the route bucket of one request always live in the same Redis Cluster slot and the
decision script runs unchanged on a single Redis, Sentinel or Cluster. The client part never
contains ``{`` or ``}``: API keys and header values are hashed, IP addresses cannot contain them.
"""

from __future__ import annotations

import base64
import hashlib

PREFIX = "sluice"
CONFIG_CHANNEL = f"{PREFIX}:config-changed"


def config_key(namespace: str) -> str:
    """Hash with fields ``version`` (integer) and ``doc`` (JSON), one per namespace.

    The hash tag keeps both fields in one slot; ``_cluster`` holds cluster-scoped policies."""
    return f"{PREFIX}:cfg:{{{namespace}}}"


def heartbeat_key(namespace: str, pod: str) -> str:
    """Sidecar heartbeat (the config version it runs), with a TTL; aggregated by the operator."""
    return f"{PREFIX}:hb:{{{namespace}}}:{pod}"


def hash_api_key(key: str) -> str:
    """SHA-256 hex digest: the only form in which an API key is stored or compared."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def short_digest(value: str) -> str:
    """16 bytes of SHA-256, base64url (22 characters): a compact, brace-free client id."""
    raw = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()[:16]
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def client_tag(policy_ref: str, client_id: str) -> str:
    """The hash-tagged prefix shared by every bucket of one client under one policy."""
    return f"{PREFIX}:b:{{{policy_ref}:{client_id}}}"


def tier_bucket_key(tag: str, tier: str) -> str:
    return f"{tag}:t:{tier}"


def rule_bucket_key(tag: str, rule: str) -> str:
    return f"{tag}:r:{rule}"
