"""The dashboard's policy cards (``GET /v1/policies``): each policy of a namespace (and each
cluster policy that selects it) with its mode, tiers, Accepted / Programmed / Enforced and how
many sidecars enforce its current version.

Where the numbers come from: with ``--api-auth kubernetes`` the policy objects' own status, as
the operator wrote it (one list call per namespace with the collector's account, which needs
``list`` on ``ratelimitpolicies`` and ``clusterratelimitpolicies``); standalone there is no
status, so the config documents in Redis (what ``sluice apply`` wrote: Accepted and Programmed
by being there) and the sidecars' fresh heartbeats, counted the way the operator counts them.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from sluice_core import configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy

from sluice_analytics.auth import GROUP, Denied, KubernetesAuth

HEARTBEAT_STALE_S = 30.0
"""A heartbeat older than this is a gone sidecar (the operator's ``--heartbeat-stale-s`` default)."""
MAX_POLICIES = 200
"""At most this many cards: a namespace with more is shown truncated (``truncated: true``)."""


def _tiers_of(policy: CompiledPolicy) -> list[dict[str, Any]]:
    return [{"name": t.name, "requests": t.limit.requests, "period_s": t.limit.period_us / 1e6,
             "burst": t.limit.burst} for t in policy.tiers.values()]


def _card(policy: CompiledPolicy, ref: str, version: int, enforced: int) -> dict[str, Any]:
    return {"ref": ref, "name": policy.name, "cluster": policy.cluster_scoped, "mode": str(policy.mode),
            "failure_mode": str(policy.failure_mode), "default_tier": policy.default_tier,
            "tiers": _tiers_of(policy), "accepted": True, "programmed": True, "enforced": enforced > 0,
            "config_version": version, "enforced_sidecars": enforced}


async def from_redis(client: configstore.Client, namespace: str) -> dict[str, Any]:
    """Standalone: the documents in Redis and the fresh heartbeats of ``namespace``'s sidecars."""
    now = time.time()
    beats = []
    for member, at in await configstore.fresh_heartbeats(client, now - HEARTBEAT_STALE_S):
        parsed = keyschema.parse_heartbeat_member(member, at)
        if parsed is not None and parsed[0] == namespace:
            beats.append(parsed[2])
    own, cluster = await configstore.read(client, namespace), await configstore.read(client, CLUSTER_SCOPE)
    cards = []
    if own is not None:
        version = own.version
        for p in own.policies:
            n = sum(b.version == version and b.policy_ref == p.name for b in beats)
            cards.append(_card(p, f"{namespace}/{p.name}", version, n))
    if cluster is not None:
        cversion = cluster.version
        for p in cluster.policies:
            if namespace in cluster.scopes.get(p.name, frozenset()):
                n = sum(b.cluster_version == cversion and b.cluster_policy_ref == p.name for b in beats)
                cards.append(_card(p, f"{CLUSTER_SCOPE}/{p.name}", cversion, n))
    return {"source": "heartbeats", "sidecars": len(beats), "policies": cards[:MAX_POLICIES],
            "truncated": len(cards) > MAX_POLICIES}


def _condition(obj: dict[str, Any], type_: str) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conds if isinstance(c, dict))


def _tiers_of_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in spec.get("tiers") or []:
        if isinstance(t, dict):
            out.append({"name": str(t.get("name", "")), "requests": t.get("requests"),
                        "period": t.get("period"), "burst": t.get("burst")})
    return out


def _object_card(obj: dict[str, Any], ref: str, cluster: bool) -> dict[str, Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return {"ref": ref, "name": str((obj.get("metadata") or {}).get("name", "")), "cluster": cluster,
            "mode": str(spec.get("mode") or "enforce"), "failure_mode": str(spec.get("failureMode") or "open"),
            "default_tier": spec.get("defaultTier"), "tiers": _tiers_of_spec(spec),
            "accepted": _condition(obj, "Accepted"), "programmed": _condition(obj, "Programmed"),
            "enforced": _condition(obj, "Enforced"), "config_version": status.get("configVersion"),
            "enforced_sidecars": status.get("enforcedSidecars")}


async def _list(auth: KubernetesAuth, path: str) -> list[dict[str, Any]]:
    try:
        token = auth.server.token()
        async with auth.session().get(auth.server.host + path, params={"limit": str(MAX_POLICIES)},
                                      headers={"Authorization": token} if token else {}) as resp:
            if resp.status >= 300:
                raise Denied(503, f"the Kubernetes API answered {resp.status} to listing policies")
            body = await resp.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise Denied(503, f"the Kubernetes API could not be asked ({type(exc).__name__})") from None
    return [i for i in body.get("items") or [] if isinstance(i, dict)]


async def from_cluster(auth: KubernetesAuth, redis: configstore.Client | None, namespace: str) -> dict[str, Any]:
    """Cluster mode: the objects' status as the operator wrote it; the cluster policies that
    select the namespace are those whose scope in Redis names it."""
    base = f"/apis/{GROUP}/v1alpha1"
    cards = [_object_card(o, f"{namespace}/{o['metadata']['name']}", False)
             for o in await _list(auth, f"{base}/namespaces/{namespace}/ratelimitpolicies")
             if isinstance(o.get("metadata"), dict)]
    scoped: frozenset[str] = frozenset()
    if redis is not None:
        cluster = await configstore.read(redis, CLUSTER_SCOPE)
        scoped = frozenset(n for n, nss in (cluster.scopes if cluster else {}).items() if namespace in nss)
    if scoped:
        cards += [_object_card(o, f"{CLUSTER_SCOPE}/{o['metadata']['name']}", True)
                  for o in await _list(auth, f"{base}/clusterratelimitpolicies")
                  if isinstance(o.get("metadata"), dict) and o["metadata"].get("name") in scoped]
    return {"source": "status", "sidecars": None, "policies": cards[:MAX_POLICIES],
            "truncated": len(cards) > MAX_POLICIES}
