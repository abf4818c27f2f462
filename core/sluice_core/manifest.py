"""Turn a compiled policy back into its normalized manifest (defaults filled in, periods spelled
canonically). This is what the operator and ``sluice apply`` store in Redis: the sidecar parses it
with the same :func:`sluice_core.parse.parse_policy`, so there is only one reader of the format."""

from __future__ import annotations

from typing import Any

from sluice_core.duration import format_duration_us
from sluice_core.keyschema import IPV6_CLIENT_PREFIX
from sluice_core.model import (
    API_VERSION,
    CLUSTER_KIND,
    KIND,
    Alert,
    CompiledPolicy,
    HeaderFrom,
    Limit,
    Selector,
    Usage,
)


def limit_to_dict(limit: Limit) -> dict[str, Any]:
    return {"requests": limit.requests, "period": format_duration_us(limit.period_us),
            "burst": limit.burst}


def selector_to_dict(sel: Selector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator, **({"values": sorted(r.values)} if r.values else {})}
            for r in sel.match_expressions
        ]
    return out


def to_manifest(p: CompiledPolicy) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for r in p.rules:
        match: dict[str, Any] = {}
        if r.path is not None:
            kind = "exact" if r.path.exact is not None else "prefix" if r.path.prefix is not None else "regex"
            match["path"] = {kind: getattr(r.path, kind)}
        if r.methods is not None:
            match["methods"] = sorted(r.methods)
        rule: dict[str, Any] = {"name": r.name, "match": match}
        if r.skip:
            rule["skip"] = True
        else:
            rule["cost"] = r.cost
            if r.limit is not None:
                rule["limit"] = limit_to_dict(r.limit)
        rules.append(rule)
    identify: dict[str, Any] = {"order": [s.value for s in p.identify.order]}
    if p.identify.header is not None:
        identify["header"] = p.identify.header
    if p.identify.header_from is not HeaderFrom.TRUSTED_PROXIES:
        # only when not the default: a sidecar older than the field still reads the others
        identify["headerFrom"] = p.identify.header_from.value
    if p.identify.trusted_proxies:
        identify["trustedProxies"] = [str(n) for n in p.identify.trusted_proxies]
    if p.identify.ipv6_prefix_length != IPV6_CLIENT_PREFIX:  # as headerFrom: only when set
        identify["ipv6PrefixLength"] = p.identify.ipv6_prefix_length
    metadata: dict[str, Any] = {"name": p.name}
    if not p.cluster_scoped:
        metadata["namespace"] = p.namespace
    spec: dict[str, Any] = {}
    if p.namespace_selector is not None:
        spec["namespaceSelector"] = selector_to_dict(p.namespace_selector)
    if p.usage != Usage():  # only when set, as identify.headerFrom: older sidecars read the rest
        spec["usage"] = {"truncateIPs": p.usage.truncate_ips}
    if p.alerts:  # as usage: only when set
        spec["alerts"] = [alert_to_dict(a) for a in p.alerts]
    return {
        "apiVersion": API_VERSION,
        "kind": CLUSTER_KIND if p.cluster_scoped else KIND,
        "metadata": metadata,
        "spec": {
            **spec,
            "selector": selector_to_dict(p.selector),
            "identify": identify,
            "apiKeys": {"header": p.api_keys.header, "required": p.api_keys.required},
            "tiers": [{"name": t.name, **limit_to_dict(t.limit)} for t in p.tiers.values()],
            "defaultTier": p.default_tier,
            "rules": rules,
            "failureMode": p.failure_mode.value,
            "mode": p.mode.value,
            "headers": p.headers.value,
        },
    }


def alert_to_dict(a: Alert) -> dict[str, Any]:
    out: dict[str, Any] = {"name": a.name, "percent": a.percent, "period": a.period.value}
    if a.tiers is not None:
        out["tiers"] = sorted(a.tiers)
    if a.webhook is not None and a.webhook.secret_ref is not None:  # the ref, never what it holds
        out["webhook"] = {"secretRef": {"name": a.webhook.secret_ref.name, "key": a.webhook.secret_ref.key}}
    elif a.webhook is not None:
        out["webhook"] = {"url": a.webhook.url}
    return out
