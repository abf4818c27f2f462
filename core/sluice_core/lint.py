"""Policy linting: valid-but-suspicious configurations, each warning naming the field.

The same warnings reach the user from ``sluice check`` and from the validating webhook
(``kubectl apply`` prints them). A policy with warnings is still valid and is enforced as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice_core.duration import format_duration_us
from sluice_core.model import CompiledPolicy, HeaderFrom, Limit, Mode, Rule, Source
from sluice_core.paths import regex_never_matched


def policy_warnings(policy: CompiledPolicy, spec: Mapping[str, Any]) -> list[str]:
    """Every warning for ``policy``; ``spec`` is its spec as written (some warnings are about
    what the author left out, which the compiled policy no longer tells apart)."""
    return [*_tier_warnings(policy), *_rule_warnings(policy), *_identify_warnings(policy),
            *_mode_warnings(policy, spec), *_selector_warnings(policy, spec)]


def _tier_warnings(policy: CompiledPolicy) -> list[str]:
    return [f"spec.tiers[{i}].burst: {tier.limit.burst} is more than 10 × requests "
            f"({tier.limit.requests}): a client can spend "
            f"{tier.limit.burst // tier.limit.requests} periods' worth at once"
            for i, tier in enumerate(policy.tiers.values())
            if tier.limit.burst > 10 * tier.limit.requests]


def _rule_warnings(policy: CompiledPolicy) -> list[str]:
    warnings: list[str] = []
    for i, rule in enumerate(policy.rules):
        warnings += _looser_than_tiers(policy, i, rule)
        warnings += _regex_warning(i, rule)
        warnings += _shadowed_by_earlier(policy, i, rule)
    return warnings


def _looser_than_tiers(policy: CompiledPolicy, i: int, rule: Rule) -> list[str]:
    if rule.limit is None:
        return []
    tiers = list(policy.tiers.values())
    looser = [t.name for t in tiers if _at_least_as_generous(rule.limit, t.limit)]
    if not looser:
        return []
    whom = "any tier" if len(looser) == len(tiers) else "tier " + ", ".join(looser)
    return [f"spec.rules[{i}].limit: {_rate(rule.limit)} is at least as generous as "
            f"{whom}: the tier's bucket always runs out first, this limit never binds"]


def _regex_warning(i: int, rule: Rule) -> list[str]:
    regex = rule.path.regex if rule.path is not None else None
    never = regex_never_matched(regex) if regex is not None else []
    if not never:
        return []
    return [f"spec.rules[{i}].match.path.regex: mentions {' and '.join(map(repr, never))}, "
            "which a path matched against it never contains (';params' and '//' are "
            "dropped, escapes decoded: '~', not '%7E'): that part never matches"]


def _shadowed_by_earlier(policy: CompiledPolicy, i: int, rule: Rule) -> list[str]:
    for j, earlier in enumerate(policy.rules[:i]):
        if _covers(earlier, rule):
            return [f"spec.rules[{i}]: never matches, spec.rules[{j}] "
                    f"({earlier.name}) comes first and matches every request it would"]
    return []


def _identify_warnings(policy: CompiledPolicy) -> list[str]:
    warnings: list[str] = []
    ident = policy.identify
    if len(policy.tiers) > 1 and Source.API_KEY not in ident.order:
        warnings.append(f"spec.tiers: {len(policy.tiers)} tiers but 'apiKey' is not in "
                        f"spec.identify.order: every client gets the default tier "
                        f"{policy.default_tier!r}")
    if Source.API_KEY in ident.order and ident.order[0] is not Source.API_KEY:
        # A known key carries the client's tier, so it always identifies first (the sidecar's
        # limiter plans it first whatever the order).
        warnings.append("spec.identify.order: a known API key identifies its client before any "
                        "other source, whatever its place in the list; list 'apiKey' first "
                        "to say so")
    if (Source.HEADER in ident.order and not ident.trusted_proxies
            and ident.header_from is HeaderFrom.TRUSTED_PROXIES):
        warnings.append(f"spec.identify.headerFrom: no peer may set {ident.header} "
                        f"(spec.identify.trustedProxies is empty), so the header source never "
                        f"applies; list the proxy that sets it, or use trustedProxiesOrLoopback")
    return warnings


def _mode_warnings(policy: CompiledPolicy, spec: Mapping[str, Any]) -> list[str]:
    if policy.mode is not Mode.SHADOW:
        return []
    warnings = ["spec.mode: shadow never refuses a request; over-limit requests are "
                "only counted (shadow_limited). Set enforce to limit"]
    if spec.get("failureMode") == "closed":
        warnings.append("spec.failureMode: closed has no effect while spec.mode is shadow "
                        "(a shadow policy lets requests through when Redis is down)")
    return warnings


def _selector_warnings(policy: CompiledPolicy, spec: Mapping[str, Any]) -> list[str]:
    if not policy.cluster_scoped and not spec.get("selector"):
        return [f"spec.selector is empty: this policy applies to every injected pod in "
                f"namespace {policy.namespace!r}"]
    if policy.cluster_scoped and not spec.get("namespaceSelector") and not spec.get("selector"):
        return ["spec.namespaceSelector and spec.selector are empty: every injected pod of "
                "every namespace shares this one budget"]
    return []


def _rate(limit: Limit) -> str:
    return f"{limit.requests}/{format_duration_us(limit.period_us)} (burst {limit.burst})"


def _at_least_as_generous(a: Limit, b: Limit) -> bool:
    """``a`` refills at least as fast as ``b`` and holds at least as many tokens."""
    return a.requests * b.period_us >= b.requests * a.period_us and a.burst >= b.burst


def _covers(earlier: Rule, later: Rule) -> bool:
    """Conservative: True only when ``earlier`` surely matches every request ``later`` does."""
    em, lm = earlier.matched_methods, later.matched_methods
    if em is not None and (lm is None or not lm <= em):
        return False
    ep, lp = earlier.path, later.path
    if ep is None:
        return True
    if earlier.skip and not later.skip:  # a skip rule matches fewer spellings (sluice_core.paths)
        return False
    if ep.regex is not None or lp is None or lp.regex is not None:
        return False
    if ep.exact is not None:
        return lp.exact == ep.exact
    assert ep.prefix is not None
    text = lp.exact if lp.exact is not None else lp.prefix
    return text is not None and text.startswith(ep.prefix)
