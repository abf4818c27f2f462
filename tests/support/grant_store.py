"""API-key grants in Redis for tests and benchmarks (:mod:`sluice_core.grants`), synchronously.

- :func:`publish_policies`: a namespace's config document that embeds no ``apiKeys`` (what the
  sidecar then resolves from Redis grants), as ``sluice apply`` writes it without a keys file.
- :func:`put_key` / :func:`revoke_key`: one key through :func:`sluice_core.configstore.put_grant`
  (the write and its change notice, as every writer does).
- :func:`fill_grants`: N grants written by a server-side script, in chunks (a million take a
  few seconds and no test-process memory); their client ids are made up (``redis.sha1hex``),
  so no API key resolves to them: they are the mass a sidecar must not pay for. Single Redis
  only (the script writes keys it does not declare, across slots).
"""

from __future__ import annotations

import time
from typing import Any

import redis
from sluice_core import configdoc, configstore, grants, keyschema
from sluice_core.model import CompiledPolicy, KeyGrant, Limit
from sluice_core.parse import parse_policy

from support.store_calls import store_call


def raw_key(api_key: str) -> bytes:
    return bytes.fromhex(keyschema.hash_api_key(api_key))


def key_policy(namespace: str, *, required: bool = True, name: str = "api", free: int = 3,
               pro: int = 1000, rule: dict[str, Any] | None = None) -> CompiledPolicy:
    """A policy selecting ``app: web`` that tells clients apart by ``X-API-Key`` (then IP), with
    tiers ``free`` (the default, ``free`` requests an hour) and ``pro``."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
        "apiKeys": {"header": "X-API-Key", "required": required},
        "tiers": [{"name": "free", "requests": free, "period": "1h"},
                  {"name": "pro", "requests": pro, "period": "1h"}],
        "defaultTier": "free"}
    if rule is not None:
        spec["rules"] = [rule]
    return parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                         "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def publish_policies(url: str, namespace: str, *policies: CompiledPolicy) -> int:
    """Write ``namespace``'s config document with these policies and no embedded keys (what the
    sidecar resolves from Redis grants); returns its version."""
    return store_call(url, configstore.publish, namespace, configdoc.build_doc(namespace, list(policies)))


def put_key(url: str, policy_ref: str, api_key: str, tier: str, *, limit: Limit | None = None,
            expires_ms: int = 0, key_id: str = "test-key") -> None:
    stored = grants.StoredGrant(KeyGrant(tier, limit), key_id, expires_ms)
    store_call(url, configstore.put_grant, policy_ref, raw_key(api_key), stored)


def revoke_key(url: str, policy_ref: str, api_key: str) -> None:
    store_call(url, configstore.revoke_grant, policy_ref, raw_key(api_key))


_FILL = """
local n, first, prefix, value = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
for i = first, first + n - 1 do
  redis.call('SET', prefix .. 'k' .. string.sub(redis.sha1hex(prefix .. i), 1, 16) .. '}:g', value)
end
return n
"""


def fill_grants(url: str, policy_ref: str, n: int, tier: str, *, chunk: int = 50_000) -> None:
    """Write ``n`` grants of ``tier`` under ``policy_ref`` (no notices: nobody holds them)."""
    r: Any = redis.Redis.from_url(url)
    try:
        prefix = keyschema.client_tag_for(keyschema.policy_id(policy_ref), "")[:-1]  # "sl:{<pid>:"
        value = grants.encode(grants.StoredGrant(KeyGrant(tier), "bulk"), policy_ref)
        script = r.register_script(_FILL)
        for first in range(0, n, chunk):
            script(keys=[], args=[min(chunk, n - first), first, prefix, value])
    finally:
        r.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
