"""Validate a ``RateLimitPolicy`` document and compile it into a :class:`CompiledPolicy`.

Every problem is collected (not just the first) and reported with its field path and the
reason, e.g. ``spec.tiers[1].requests: must be a positive integer, got -5``. The admission
webhook, ``sluice check``, ``sluice apply`` and the sidecar all use this one function.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from sluice_core.duration import parse_duration_us
from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.keyschema import IPV6_CLIENT_PREFIX
from sluice_core.model import (
    API_VERSION,
    CLUSTER_KIND,
    CLUSTER_SCOPE,
    IPV6_PREFIX_MIN,
    KIND,
    Alert,
    AlertPeriod,
    ApiKeys,
    CompiledPolicy,
    FailureMode,
    HeaderFrom,
    HeaderStyle,
    Identify,
    IPNetwork,
    LabelRequirement,
    Limit,
    Mode,
    PathMatch,
    Rule,
    SecretKeyRef,
    Selector,
    Source,
    Tier,
    Usage,
    Webhook,
)
from sluice_core.paths import (
    MAX_REGEX_RULES,
    POLICY_REGEX_MEMORY,
    RegexError,
    compile_regex,
    is_canonical,
    normalise,
    regex_budget,
    skip_rule_text_canonical,
)

# Kubernetes object names (RFC 1123 subdomain), tier and rule names (RFC 1123 label).
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")  # a Secret's data key, as Kubernetes allows it
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
MAX_TOKENS = 1_000_000_000  # requests, burst and cost: keeps bucket arithmetic exact
MAX_RATE_PER_S = 1_000_000  # per client: bucket arithmetic is in whole microseconds
MAX_CAPACITY_US = 10 * 366 * 86_400_000_000  # keeps TAT + capacity far below 2**53
MAX_TIERS = 64
MAX_RULES = 256
MAX_PATH = 2048

_SPEC_FIELDS = {
    "selector", "namespaceSelector", "identify", "apiKeys", "tiers", "defaultTier", "rules",
    "failureMode", "mode", "headers", "usage", "alerts",
}
MAX_ALERTS = 16
MAX_WEBHOOK_URL = 2048


class DocumentChecker:
    """Collects every error (field path and reason) while walking a document; each check
    returns None (or its default) on failure. Shared by the readers of policies, API-key
    files (:mod:`apikeys`) and config documents (:mod:`configdoc`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[PolicyError] = []

    def fail(self, path: str, reason: str) -> None:
        self.errors.append(PolicyError(path, reason, self.source))

    def mapping(self, value: Any, path: str, *, required: bool = False) -> Mapping[str, Any] | None:
        if value is None:
            if required:
                self.fail(path, "is required")
            return None
        if not isinstance(value, Mapping):
            self.fail(path, f"must be an object, got {_kind(value)}")
            return None
        return value

    def unknown(self, value: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in value:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.fail(f"{path}.{key}", f"unknown field (known fields: {known})")

    def seq(self, value: Any, path: str) -> list[Any] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_kind(value)}")
            return None
        return value

    def positive_int(self, value: Any, path: str, *, maximum: int = MAX_TOKENS) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(path, f"must be a positive integer, got {value!r}")
            return None
        if value > maximum:
            self.fail(path, f"must be at most {maximum}, got {value}")
            return None
        return value

    def string(self, value: Any, path: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(path, f"must be a non-empty string, got {value!r}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"must be {what}, got {value!r}")
            return None
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {value!r}")
            return default
        return value

    def enum(self, value: Any, path: str, choices: type[Any], default: Any) -> Any:
        if value is None:
            return default
        allowed = [c.value for c in choices]
        if value not in allowed:
            self.fail(path, f"must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return choices(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def parse_policy(doc: Any, *, source: str = "", default_namespace: str = "default") -> CompiledPolicy:
    """Validate one policy document and compile it; raise :class:`PolicyErrors` listing every problem."""
    c = DocumentChecker(source)
    policy = _parse(c, doc, default_namespace)
    if c.errors or policy is None:
        raise PolicyErrors(c.errors or [PolicyError("", "invalid policy", source)])
    return policy


def _parse(c: DocumentChecker, doc: Any, default_namespace: str) -> CompiledPolicy | None:
    top = c.mapping(doc, "(document)", required=True)
    if top is None:
        return None
    c.unknown(top, "", {"apiVersion", "kind", "metadata", "spec", "status"})
    if top.get("apiVersion") != API_VERSION:
        c.fail("apiVersion", f"must be {API_VERSION}, got {top.get('apiVersion')!r}")
    kind = top.get("kind")
    if kind not in (KIND, CLUSTER_KIND):
        c.fail("kind", f"must be {KIND} or {CLUSTER_KIND}, got {kind!r}")
    cluster_scoped = kind == CLUSTER_KIND

    meta = c.mapping(top.get("metadata"), "metadata", required=True) or {}
    name = c.string(meta.get("name"), "metadata.name", pattern=_DNS_SUBDOMAIN,
                    what="a lowercase RFC 1123 name") if meta else None
    if name is not None and len(name) > 253:
        c.fail("metadata.name", "must be at most 253 characters")
    if cluster_scoped:
        namespace = CLUSTER_SCOPE
    else:
        ns = meta.get("namespace", default_namespace) if meta else default_namespace
        namespace = c.string(ns, "metadata.namespace", pattern=_NAME,
                             what="a lowercase RFC 1123 label") or default_namespace

    spec = c.mapping(top.get("spec"), "spec", required=True)
    if spec is None:
        return None
    c.unknown(spec, "spec", _SPEC_FIELDS)
    if "namespaceSelector" in spec and not cluster_scoped:
        c.fail("spec.namespaceSelector", f"is only allowed on {CLUSTER_KIND}")

    selector = _selector(c, spec.get("selector"), "spec.selector")
    namespace_selector = (_selector(c, spec.get("namespaceSelector"), "spec.namespaceSelector")
                          if cluster_scoped else None)
    api_keys = _api_keys(c, spec.get("apiKeys"))
    identify = _identify(c, spec.get("identify"), api_keys)
    tiers = _tiers(c, spec.get("tiers"))
    default_tier = spec.get("defaultTier")
    if default_tier is None and tiers:
        default_tier = next(iter(tiers))
    if default_tier is not None and tiers and default_tier not in tiers:
        c.fail("spec.defaultTier", f"must name a declared tier ({', '.join(tiers)}), got {default_tier!r}")
    rules = _rules(c, spec.get("rules"))
    for i, rule in enumerate(rules):
        short = [f"{t.name} ({t.limit.burst})" for t in tiers.values() if t.limit.burst < rule.cost]
        if short and not rule.skip:
            c.fail(f"spec.rules[{i}].cost", f"is {rule.cost}, more than the burst of tier "
                   f"{', '.join(short)}: those clients could never pass")
    failure_mode = c.enum(spec.get("failureMode"), "spec.failureMode", FailureMode, FailureMode.OPEN)
    mode = c.enum(spec.get("mode"), "spec.mode", Mode, Mode.ENFORCE)
    headers = c.enum(spec.get("headers"), "spec.headers", HeaderStyle, HeaderStyle.DRAFT)
    usage = _usage(c, spec.get("usage"))
    alerts = _alerts(c, spec.get("alerts"), tiers)
    if c.errors or name is None or not tiers or not isinstance(default_tier, str):
        return None
    return CompiledPolicy(
        namespace=namespace, name=name, selector=selector, identify=identify, api_keys=api_keys,
        tiers=tiers, default_tier=default_tier, rules=rules, failure_mode=failure_mode, mode=mode,
        headers=headers, cluster_scoped=cluster_scoped, namespace_selector=namespace_selector,
        usage=usage, alerts=alerts,
    )


def _usage(c: DocumentChecker, value: Any) -> Usage:
    """``spec.usage``: how the sidecars report this policy's traffic (usage analytics)."""
    m = c.mapping(value, "spec.usage")
    if m is None:
        return Usage()
    c.unknown(m, "spec.usage", {"truncateIPs"})
    return Usage(truncate_ips=c.boolean(m.get("truncateIPs"), "spec.usage.truncateIPs", False))


def _alerts(c: DocumentChecker, value: Any, tiers: Mapping[str, Tier]) -> tuple[Alert, ...]:
    """``spec.alerts``: near-limit alerts, detected by the usage collector."""
    items = c.seq(value, "spec.alerts") or []
    if len(items) > MAX_ALERTS:
        c.fail("spec.alerts", f"must have at most {MAX_ALERTS} alerts, got {len(items)}")
        return ()
    out: list[Alert] = []
    for i, item in enumerate(items):
        p = f"spec.alerts[{i}]"
        m = c.mapping(item, p, required=True)
        if m is None:
            continue
        c.unknown(m, p, {"name", "percent", "period", "tiers", "webhook"})
        name = c.string(m.get("name"), f"{p}.name", pattern=_NAME, what="a lowercase RFC 1123 label")
        if name is not None and any(a.name == name for a in out):
            c.fail(f"{p}.name", f"duplicate alert name {name!r}")
        percent = m.get("percent")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
            c.fail(f"{p}.percent", f"must be a whole number from 1 to 100 (a share of the allowance), got {percent!r}")
        period = c.enum(m.get("period"), f"{p}.period", AlertPeriod, None)
        if period is None and "period" not in m:
            c.fail(f"{p}.period", "is required: hour or day")
        alert_tiers: frozenset[str] | None = None
        if "tiers" in m:
            names = c.seq(m.get("tiers"), f"{p}.tiers") or []
            unknown = [t for t in names if t not in tiers]
            if not names:
                c.fail(f"{p}.tiers", "must name at least one tier (leave it out for every tier)")
            elif unknown and tiers:
                c.fail(f"{p}.tiers", f"must name declared tiers ({', '.join(tiers)}), got {unknown!r}")
            alert_tiers = frozenset(t for t in names if isinstance(t, str))
        webhook = _webhook(c, m.get("webhook"), f"{p}.webhook")
        if c.errors or name is None or period is None or not isinstance(percent, int):
            continue
        out.append(Alert(name=name, percent=percent, period=period, tiers=alert_tiers, webhook=webhook))
    return tuple(out)


def _webhook(c: DocumentChecker, value: Any, path: str) -> Webhook | None:
    m = c.mapping(value, path)
    if m is None:
        return None
    c.unknown(m, path, {"url", "secretRef"})
    if ("url" in m) == ("secretRef" in m):
        c.fail(path, "must set exactly one of url and secretRef (a Secret holding the URL)")
        return None
    if "secretRef" in m:
        ref = c.mapping(m.get("secretRef"), f"{path}.secretRef", required=True)
        if ref is None:
            return None
        c.unknown(ref, f"{path}.secretRef", {"name", "key"})
        name = c.string(ref.get("name"), f"{path}.secretRef.name", pattern=_DNS_SUBDOMAIN,
                        what="a Secret's name (a lowercase RFC 1123 subdomain)")
        key = c.string(ref.get("key"), f"{path}.secretRef.key", pattern=_SECRET_KEY,
                       what="a Secret's key (letters, digits, '-', '_', '.')")
        if name is None or key is None:
            return None
        if len(name) > 253 or len(key) > 253:
            c.fail(f"{path}.secretRef", "name and key must be at most 253 characters each")
            return None
        return Webhook(secret_ref=SecretKeyRef(name, key))
    url = c.string(m.get("url"), f"{path}.url")
    if url is None:
        return None
    problem = webhook_url_problem(url)
    if problem:
        c.fail(f"{path}.url", problem)
        return None
    return Webhook(url=url)


def webhook_url_problem(url: str) -> str | None:
    """Why ``url`` is no webhook URL (None: it is one). The parser checks a policy's
    ``webhook.url`` with it, the collector the URL it read from a ``webhook.secretRef``."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError: not a number, or out of range
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if port == 0:
        return "must not name port 0"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if len(url) > MAX_WEBHOOK_URL or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return f"must be at most {MAX_WEBHOOK_URL} characters, without spaces or control characters"
    if parts.username or parts.password:
        return "must not carry credentials (they would show in the policy and the config document)"
    return None


def _selector(c: DocumentChecker, value: Any, path: str) -> Selector:
    sel = c.mapping(value, path)
    if sel is None:
        return Selector()
    c.unknown(sel, path, {"matchLabels", "matchExpressions"})
    labels: list[tuple[str, str]] = []
    ml = c.mapping(sel.get("matchLabels"), f"{path}.matchLabels") or {}
    for k, v in ml.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k):
            c.fail(f"{path}.matchLabels", f"label key must be a valid Kubernetes label key, got {k!r}")
        elif not isinstance(v, str):
            c.fail(f"{path}.matchLabels.{k}", f"must be a string, got {v!r}")
        else:
            labels.append((k, v))
    exprs: list[LabelRequirement] = []
    for i, e in enumerate(c.seq(sel.get("matchExpressions"), f"{path}.matchExpressions") or []):
        p = f"{path}.matchExpressions[{i}]"
        m = c.mapping(e, p, required=True)
        if m is None:
            continue
        c.unknown(m, p, {"key", "operator", "values"})
        key = c.string(m.get("key"), f"{p}.key", pattern=_LABEL_KEY, what="a valid label key")
        op = m.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            c.fail(f"{p}.operator", f"must be one of In, NotIn, Exists, DoesNotExist, got {op!r}")
            continue
        values = c.seq(m.get("values"), f"{p}.values") or []
        if op in ("In", "NotIn") and not values:
            c.fail(f"{p}.values", f"must be a non-empty list for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            c.fail(f"{p}.values", f"must be empty for operator {op}")
        if any(not isinstance(v, str) for v in values):
            c.fail(f"{p}.values", "must be a list of strings")
            continue
        if key is not None:
            exprs.append(LabelRequirement(key, op, frozenset(values)))
    return Selector(tuple(sorted(labels)), tuple(exprs))


def _api_keys(c: DocumentChecker, value: Any) -> ApiKeys:
    m = c.mapping(value, "spec.apiKeys")
    if m is None:
        return ApiKeys()
    c.unknown(m, "spec.apiKeys", {"header", "required"})
    header = m.get("header", "X-API-Key")
    header = c.string(header, "spec.apiKeys.header", pattern=_HEADER_NAME, what="an HTTP header name")
    return ApiKeys(header=header or "X-API-Key", required=c.boolean(m.get("required"), "spec.apiKeys.required", False))


def _identify(c: DocumentChecker, value: Any, api_keys: ApiKeys) -> Identify:
    m = c.mapping(value, "spec.identify")
    if m is None:
        return Identify()
    c.unknown(m, "spec.identify", {"order", "header", "headerFrom", "trustedProxies", "ipv6PrefixLength"})
    order: list[Source] = []
    raw_order = c.seq(m.get("order"), "spec.identify.order")
    for i, s in enumerate(raw_order if raw_order is not None else ["apiKey", "ip"]):
        if s not in [x.value for x in Source]:
            c.fail(f"spec.identify.order[{i}]", f"must be one of apiKey, header, ip, got {s!r}")
        elif Source(s) in order:
            c.fail(f"spec.identify.order[{i}]", f"{s!r} is listed twice")
        else:
            order.append(Source(s))
    if raw_order is not None and not raw_order:
        c.fail("spec.identify.order", "must list at least one of apiKey, header, ip")
    header = None
    if "header" in m or Source.HEADER in order:
        header = c.string(m.get("header"), "spec.identify.header", pattern=_HEADER_NAME,
                          what="an HTTP header name")
        if header is not None and Source.HEADER not in order:
            c.fail("spec.identify.header", "is set but 'header' is not in spec.identify.order")
    header_from = c.enum(m.get("headerFrom"), "spec.identify.headerFrom", HeaderFrom,
                         HeaderFrom.TRUSTED_PROXIES)
    proxies: list[IPNetwork] = []
    for i, cidr in enumerate(c.seq(m.get("trustedProxies"), "spec.identify.trustedProxies") or []):
        try:
            proxies.append(ipaddress.ip_network(str(cidr), strict=True))
        except ValueError as exc:
            c.fail(f"spec.identify.trustedProxies[{i}]", f"must be an IP address or CIDR, got {cidr!r} ({exc})")
    if api_keys.required and Source.API_KEY not in order:
        c.fail("spec.apiKeys.required", "is true but 'apiKey' is not in spec.identify.order")
    prefix = m.get("ipv6PrefixLength", IPV6_CLIENT_PREFIX)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not IPV6_PREFIX_MIN <= prefix <= 128:
        c.fail("spec.identify.ipv6PrefixLength",
               f"must be an integer from {IPV6_PREFIX_MIN} to 128, got {prefix!r}")
        prefix = IPV6_CLIENT_PREFIX
    return Identify(order=tuple(order), header=header, trusted_proxies=tuple(proxies),
                    header_from=header_from, ipv6_prefix_length=prefix)


def parse_limit(c: DocumentChecker, m: Mapping[str, Any], path: str) -> Limit | None:
    requests = c.positive_int(m.get("requests"), f"{path}.requests")
    period_raw = m.get("period")
    period_us: int | None = None
    if period_raw is None:
        c.fail(f"{path}.period", "is required (e.g. 1s, 1m, 1h, 1d)")
    else:
        try:
            period_us = parse_duration_us(period_raw)
        except ValueError as exc:
            c.fail(f"{path}.period", str(exc))
    burst_raw = m.get("burst")
    burst = requests if burst_raw is None else c.positive_int(burst_raw, f"{path}.burst")
    if requests is None or period_us is None or burst is None:
        return None
    limit = Limit(requests=requests, period_us=period_us, burst=burst)
    if requests * 1_000_000 > MAX_RATE_PER_S * period_us:
        c.fail(f"{path}.requests", f"{requests} per {period_raw} is more than {MAX_RATE_PER_S} per second")
        return None
    if limit.capacity_us > MAX_CAPACITY_US:
        c.fail(f"{path}.burst", f"{burst} tokens take more than 10 years to refill at this rate")
        return None
    return limit


def parse_limit_text(text: str) -> Limit:
    """A limit in its compact form, ``<requests>/<period>[/<burst>]`` (key Secrets, ``sluice
    keys``), checked exactly like a limit in a policy; ValueError says what is wrong."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"must be <requests>/<period>[/<burst>], got {text!r}")
    m: dict[str, Any] = {"requests": _int_or_text(parts[0]), "period": parts[1]}
    if len(parts) == 3:
        m["burst"] = _int_or_text(parts[2])
    c = DocumentChecker("limit")
    limit = parse_limit(c, m, "limit")
    if limit is None:
        raise ValueError("; ".join(f"{e.path}: {e.reason}" for e in c.errors))
    return limit


def _int_or_text(text: str) -> int | str:
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _tiers(c: DocumentChecker, value: Any) -> dict[str, Tier]:
    items = c.seq(value, "spec.tiers")
    if items is None:
        c.fail("spec.tiers", "is required: declare at least one tier")
        return {}
    if not items:
        c.fail("spec.tiers", "must declare at least one tier")
    if len(items) > MAX_TIERS:
        c.fail("spec.tiers", f"must declare at most {MAX_TIERS} tiers, got {len(items)}")
    tiers: dict[str, Tier] = {}
    for i, item in enumerate(items):
        p = f"spec.tiers[{i}]"
        m = c.mapping(item, p, required=True)
        if m is None:
            continue
        c.unknown(m, p, {"name", "requests", "period", "burst"})
        name = c.string(m.get("name"), f"{p}.name", pattern=_NAME, what="a lowercase RFC 1123 label")
        if name is not None and name in tiers:
            c.fail(f"{p}.name", f"duplicate tier name {name!r}")
            name = None
        limit = parse_limit(c, m, p)
        if name is not None and limit is not None:
            tiers[name] = Tier(name, limit)
    return tiers


def _rules(c: DocumentChecker, value: Any) -> tuple[Rule, ...]:
    items = c.seq(value, "spec.rules") or []
    if len(items) > MAX_RULES:
        c.fail("spec.rules", f"must have at most {MAX_RULES} rules, got {len(items)}")
    pending: list[tuple[str, dict[str, Any]]] = []  # (field path, the Rule's fields but its regex)
    names: set[str] = set()
    for i, item in enumerate(items):
        p = f"spec.rules[{i}]"
        m = c.mapping(item, p, required=True)
        if m is None:
            continue
        c.unknown(m, p, {"name", "match", "limit", "cost", "skip"})
        name = c.string(m.get("name"), f"{p}.name", pattern=_NAME, what="a lowercase RFC 1123 label")
        if name is not None and name in names:
            c.fail(f"{p}.name", f"duplicate rule name {name!r}")
        if name is not None:
            names.add(name)
        skip = c.boolean(m.get("skip"), f"{p}.skip", False)
        path, methods = _match(c, m.get("match"), f"{p}.match", skip)
        limit = None
        lm = c.mapping(m.get("limit"), f"{p}.limit")
        if lm is not None:
            c.unknown(lm, f"{p}.limit", {"requests", "period", "burst"})
            limit = parse_limit(c, lm, f"{p}.limit")
        cost = 1 if m.get("cost") is None else c.positive_int(m.get("cost"), f"{p}.cost")
        if skip and (lm is not None or m.get("cost") is not None):
            c.fail(f"{p}.skip", "a skipped rule cannot also set limit or cost")
        if lm is None and m.get("cost") is None and not skip:
            c.fail(p, "must set at least one of limit, cost or skip")
        if cost is not None and limit is not None and cost > limit.burst:
            c.fail(f"{p}.cost", f"is {cost}, more than the rule's burst {limit.burst}: no request could ever pass")
        if name is not None and cost is not None:
            pending.append((p, {"name": name, "path": path, "methods": methods, "limit": limit,
                                "cost": cost, "skip": skip}))
    return _compile_regexes(c, pending)


def _compile_regexes(c: DocumentChecker, pending: list[tuple[str, dict[str, Any]]]) -> tuple[Rule, ...]:
    """Compile every rule regex once, here, within the share of the policy's RE2 memory budget
    that each gets (sluice_core.paths.regex_budget)."""
    patterns = [r["path"].regex if r["path"] is not None else None for _, r in pending]
    count = sum(1 for x in patterns if x is not None)
    if count > MAX_REGEX_RULES:
        c.fail("spec.rules", f"must have at most {MAX_REGEX_RULES} regex rules, got {count} "
               f"(they share {POLICY_REGEX_MEMORY >> 20} MiB of RE2 memory): use exact or prefix "
               f"paths, or one regex with alternatives")
        return ()
    budget = regex_budget(count)
    rules: list[Rule] = []
    for (p, fields), pattern in zip(pending, patterns, strict=True):
        if pattern is None:
            rules.append(Rule(**fields))
            continue
        try:
            regex = compile_regex(pattern, skip=fields["skip"], max_mem=budget)
        except RegexError as exc:
            share = (f" (each of this policy's {count} regex rules may use {budget >> 10} KiB)"
                     if "too large" in str(exc) else "")
            c.fail(f"{p}.match.path.regex", "is not a valid regular expression for RE2, the "
                   "linear-time engine rules run on (no backreferences, lookaround or "
                   f"possessive repeats){share}: {exc}")
            continue
        rules.append(Rule(**fields, regex=regex))
    return tuple(rules)


def _match(c: DocumentChecker, value: Any, path: str,
           skip: bool) -> tuple[PathMatch | None, frozenset[str] | None]:
    m = c.mapping(value, path, required=True)
    if m is None:
        return None, None
    c.unknown(m, path, {"path", "methods"})
    pm = None
    pv = c.mapping(m.get("path"), f"{path}.path")
    if pv is not None:
        c.unknown(pv, f"{path}.path", {"exact", "prefix", "regex"})
        set_ = [k for k in ("exact", "prefix", "regex") if k in pv]
        if len(set_) != 1:
            c.fail(f"{path}.path", f"must set exactly one of exact, prefix, regex, got {set_ or 'none'}")
        else:
            kind = set_[0]
            text = c.string(pv[kind], f"{path}.path.{kind}")
            if text is not None:
                if len(text) > MAX_PATH:
                    c.fail(f"{path}.path.{kind}", f"must be at most {MAX_PATH} characters")
                elif kind != "regex" and not text.startswith("/"):
                    c.fail(f"{path}.path.{kind}", f"must start with '/', got {text!r}")
                elif skip and kind != "regex" and not skip_rule_text_canonical(text, prefix=kind == "prefix"):
                    c.fail(f"{path}.path.{kind}", _not_canonical(text))
                else:
                    pm = PathMatch(**{kind: text})
    methods = None
    mv = c.seq(m.get("methods"), f"{path}.methods")
    if mv is not None:
        bad = [x for x in mv if not isinstance(x, str) or x.upper() not in _METHODS]
        if bad or not mv:
            c.fail(f"{path}.methods", f"must be a non-empty list of HTTP methods, got {mv!r}")
        else:
            methods = frozenset(x.upper() for x in mv)
    if pv is None and mv is None:
        c.fail(path, "must set path, methods or both")
    return pm, methods


def _not_canonical(text: str) -> str:
    """Why a skip rule's text is refused, and what to write instead when there is a plain form."""
    reason = (f"{text!r} can never match: a skip rule matches only a path sent in plain canonical "
              f"form (no percent-escape, ';', '\\', '//', '.' or '..' segment)")
    suggestion = normalise(text) + ("/" if text.endswith("/") and normalise(text) != "/" else "")
    if is_canonical(suggestion):
        reason += f"; write {suggestion!r}"
    return reason
