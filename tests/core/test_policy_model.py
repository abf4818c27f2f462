"""The policy model: parsing, validation messages, normalisation round trips."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_core.configdoc import build_doc, load_doc
from sluice_core.duration import format_duration_us, parse_duration_us
from sluice_core.errors import PolicyErrors
from sluice_core.manifest import to_manifest
from sluice_core.model import FailureMode, HeaderFrom, HeaderStyle, Mode, Source
from sluice_core.parse import parse_policy
from sluice_core.policyfile import load_policies
from support.paths import ROOT

EXAMPLES = ROOT / "crds" / "examples"


def minimal(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"tiers": [{"name": "free", "requests": 10, "period": "1m"}]},
    }
    base["spec"].update(spec)
    return base


def errors_of(doc: Any) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc)
    return [f"{e.path}: {e.reason}" for e in info.value.errors]


def test_minimal_policy_gets_documented_defaults() -> None:
    p = parse_policy(minimal())
    assert p.ref == "ns/p"
    assert p.default_tier == "free"
    assert p.tiers["free"].limit.burst == 10  # burst defaults to requests
    assert p.identify.order == (Source.API_KEY, Source.IP)
    assert p.identify.header_from is HeaderFrom.TRUSTED_PROXIES and not p.identify.trusted_proxies
    assert p.api_keys.header == "X-API-Key" and not p.api_keys.required
    assert (p.failure_mode, p.mode, p.headers) == (FailureMode.OPEN, Mode.ENFORCE, HeaderStyle.DRAFT)
    assert p.selector.matches({"anything": "x"})


@pytest.mark.parametrize(("value", "us"), [
    ("1s", 1_000_000), ("1m", 60_000_000), ("1h", 3_600_000_000), ("1d", 86_400_000_000),
    ("1h30m", 5_400_000_000), ("250ms", 250_000), (30, 30_000_000), ("2.5", 2_500_000), (0.5, 500_000),
])
def test_durations(value: Any, us: int) -> None:
    assert parse_duration_us(value) == us
    assert parse_duration_us(format_duration_us(us)) == us


@pytest.mark.parametrize("value", ["", "1 minute", "-1s", "1w", 0, -3, True, None, "1s1", "0ms", "400d"])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse_duration_us(value)


def test_error_names_field_path_and_reason() -> None:
    doc = minimal(tiers=[{"name": "free", "requests": 10, "period": "1m"},
                         {"name": "pro", "requests": -5, "period": "1m"}])
    assert errors_of(doc) == ["spec.tiers[1].requests: must be a positive integer, got -5"]


def test_all_errors_are_reported_at_once() -> None:
    doc = minimal(tiers=[{"name": "Free", "requests": 0, "period": "soon", "burst": "x"}],
                  mode="loud", failureMode="sideways", headers="all", bogus=1)
    errs = errors_of(doc)
    assert any(e.startswith("spec.tiers[0].name:") for e in errs)
    assert "spec.tiers[0].requests: must be a positive integer, got 0" in errs
    assert any(e.startswith("spec.tiers[0].period:") for e in errs)
    assert "spec.tiers[0].burst: must be a positive integer, got 'x'" in errs
    assert "spec.mode: must be one of enforce, shadow, got 'loud'" in errs
    assert "spec.failureMode: must be one of open, closed, got 'sideways'" in errs
    assert "spec.headers: must be one of draft, legacy, both, none, got 'all'" in errs
    assert any(e.startswith("spec.bogus: unknown field") for e in errs)


@pytest.mark.parametrize(("patch", "expected"), [
    ({"defaultTier": "gold"}, "spec.defaultTier: must name a declared tier (free), got 'gold'"),
    ({"tiers": []}, "spec.tiers: must declare at least one tier"),
    ({"tiers": "free"}, "spec.tiers: must be a list, got a string"),
    ({"rules": [{"name": "r", "match": {"path": {"exact": "x"}}, "cost": 2}]},
     "spec.rules[0].match.path.exact: must start with '/', got 'x'"),
    ({"rules": [{"name": "r", "match": {"path": {"exact": "/a", "prefix": "/b"}}, "cost": 2}]},
     "spec.rules[0].match.path: must set exactly one of exact, prefix, regex, got ['exact', 'prefix']"),
    ({"rules": [{"name": "r", "match": {"methods": ["FETCH"]}, "cost": 2}]},
     "spec.rules[0].match.methods: must be a non-empty list of HTTP methods, got ['FETCH']"),
    ({"rules": [{"name": "r", "match": {"methods": ["GET"]}}]},
     "spec.rules[0]: must set at least one of limit, cost or skip"),
    ({"rules": [{"name": "r", "match": {"methods": ["GET"]}, "skip": True, "cost": 3}]},
     "spec.rules[0].skip: a skipped rule cannot also set limit or cost"),
    ({"rules": [{"name": "r", "match": {"methods": ["GET"]}, "cost": 5,
                 "limit": {"requests": 2, "period": "1s"}}]},
     "spec.rules[0].cost: is 5, more than the rule's burst 2: no request could ever pass"),
    ({"identify": {"order": ["ip", "ip"]}}, "spec.identify.order[1]: 'ip' is listed twice"),
    ({"identify": {"order": ["cookie"]}}, "spec.identify.order[0]: must be one of apiKey, header, ip, got 'cookie'"),
    ({"identify": {"order": ["header"]}}, "spec.identify.header: must be a non-empty string, got None"),
    ({"identify": {"order": ["header", "ip"], "header": "X-User-Id", "headerFrom": "anyone"}},
     "spec.identify.headerFrom: must be one of trustedProxies, trustedProxiesOrLoopback, got 'anyone'"),
    ({"identify": {"trustedProxies": ["10.0.0.0/33"]}},
     "spec.identify.trustedProxies[0]: must be an IP address or CIDR, got '10.0.0.0/33'"),
    ({"apiKeys": {"header": "X Bad"}}, "spec.apiKeys.header: must be an HTTP header name, got 'X Bad'"),
    ({"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
     "spec.selector.matchExpressions[0].values: must be a non-empty list for operator In"),
    ({"tiers": [{"name": "free", "requests": 3, "period": "1s"}, {"name": "pro", "requests": 9, "period": "1s"}],
      "rules": [{"name": "r", "match": {"methods": ["GET"]}, "cost": 5}]},
     "spec.rules[0].cost: is 5, more than the burst of tier free (3): those clients could never pass"),
    ({"tiers": [{"name": "free", "requests": 2_000_000, "period": "1s"}]},
     "spec.tiers[0].requests: 2000000 per 1s is more than 1000000 per second"),
])
def test_specific_messages(patch: dict[str, Any], expected: str) -> None:
    errs = errors_of(minimal(**patch))
    assert any(e.startswith(expected) for e in errs), errs


def test_top_level_checks() -> None:
    doc = minimal()
    doc["apiVersion"] = "v1"
    doc["kind"] = "Pod"
    doc["metadata"]["name"] = "Not_A_Name"
    errs = errors_of(doc)
    assert "apiVersion: must be sluice.dev/v1alpha1, got 'v1'" in errs
    assert "kind: must be RateLimitPolicy or ClusterRateLimitPolicy, got 'Pod'" in errs
    assert "metadata.name: must be a lowercase RFC 1123 name, got 'Not_A_Name'" in errs
    assert errors_of("just a string") == ["(document): must be an object, got a string"]


def test_namespace_selector_only_on_cluster_kind() -> None:
    assert "spec.namespaceSelector: is only allowed on ClusterRateLimitPolicy" in errors_of(
        minimal(namespaceSelector={"matchLabels": {"team": "a"}}))
    doc = minimal(namespaceSelector={"matchLabels": {"team": "a"}})
    doc["kind"] = "ClusterRateLimitPolicy"
    p = parse_policy(doc)
    assert p.cluster_scoped and p.namespace == "_cluster"


def test_rules_first_match_wins_and_match_kinds() -> None:
    p = parse_policy(minimal(rules=[
        {"name": "health", "match": {"path": {"prefix": "/healthz"}}, "skip": True},
        {"name": "exp", "match": {"path": {"exact": "/api/expensive"}, "methods": ["post"]}, "cost": 3},
        {"name": "search", "match": {"path": {"regex": "/s/[0-9]+"}}, "limit": {"requests": 1, "period": "1s"}},
        {"name": "writes", "match": {"methods": ["PUT", "DELETE"]}, "cost": 2},
    ]))
    def m(method: str, path: str) -> str | None:
        r = p.match_rule(method, path)
        return r.name if r else None
    assert m("GET", "/healthz/live") == "health"
    assert m("POST", "/api/expensive") == "exp"
    assert m("GET", "/api/expensive") is None
    assert m("GET", "/api/expensive/x") is None
    assert m("GET", "/s/42") == "search"
    assert m("GET", "/s/42/x") is None  # regex must match the whole path
    assert m("DELETE", "/anything") == "writes"


def test_a_limiting_rule_for_get_matches_head_and_a_skip_rule_does_not() -> None:
    """Frameworks answer HEAD with the GET handler (same work): HEAD cannot dodge a GET rule's
    cost or limit. A skip rule leans the other way and stays exact."""
    p = parse_policy(minimal(rules=[
        {"name": "ping", "match": {"path": {"exact": "/ping"}, "methods": ["GET"]}, "skip": True},
        {"name": "export", "match": {"path": {"prefix": "/export"}, "methods": ["GET"]}, "cost": 5},
        {"name": "any", "match": {"methods": ["GET", "POST"]}, "cost": 2},
    ]))
    def m(method: str, path: str) -> str | None:
        r = p.match_rule(method, path)
        return r.name if r else None
    assert [m("GET", "/ping"), m("HEAD", "/ping")] == ["ping", "any"]
    assert [m("GET", "/export/x"), m("HEAD", "/export/x"), m("POST", "/export/x")] == ["export", "export", "any"]
    assert [m("HEAD", "/other"), m("PUT", "/other")] == ["any", None]
    assert p.rules[1].methods == frozenset({"GET"})  # as spelled; matched_methods adds HEAD


def test_label_selector_semantics() -> None:
    p = parse_policy(minimal(selector={
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "team", "operator": "Exists"},
        ]}))
    ok = {"app": "web", "tier": "a", "team": "x", "env": "prod"}
    assert p.selector.matches(ok)
    assert not p.selector.matches({**ok, "app": "api"})
    assert not p.selector.matches({**ok, "tier": "c"})
    assert not p.selector.matches({**ok, "canary": "1"})
    assert not p.selector.matches({**ok, "env": "dev"})
    assert not p.selector.matches({k: v for k, v in ok.items() if k != "team"})


def test_examples_validate_and_round_trip() -> None:
    policies = load_policies(EXAMPLES / "public-api.yaml")
    policies += load_policies(EXAMPLES / "internal-service.yaml")
    policies += load_policies(EXAMPLES / "keys-required.yaml")
    assert {p.name for p in policies} == {"public-api", "orders-internal", "partner-api"}
    for p in policies:
        again = parse_policy(to_manifest(p))
        assert again == p, p.name
        assert to_manifest(again) == to_manifest(p)


def test_cluster_examples_trust_no_proxy_and_the_demo_differs_only_there() -> None:
    """A cluster example that trusts a proxy would teach users to let anyone in that range
    choose their identity; the demo's copy trusts its own 127.0.0.1 (see its comment) and runs
    in the demo's namespace rather than the install example's."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for p in load_policies(path):
            assert not p.identify.trusted_proxies, path.name
    demo = load_policies(ROOT / "core" / "sluice_core" / "examples" / "public-api.yaml")[0]
    cluster = load_policies(EXAMPLES / "public-api.yaml")[0]
    assert [str(n) for n in demo.identify.trusted_proxies] == ["127.0.0.1/32"]
    assert demo == replace(cluster, namespace=demo.namespace,
                           identify=replace(cluster.identify, trusted_proxies=demo.identify.trusted_proxies))


def test_header_from_round_trips_and_is_stored_only_when_not_the_default() -> None:
    loopback = parse_policy(minimal(identify={"order": ["header", "ip"], "header": "X-User-Id",
                                              "headerFrom": "trustedProxiesOrLoopback"}))
    assert loopback.identify.header_from is HeaderFrom.TRUSTED_PROXIES_OR_LOOPBACK
    assert to_manifest(loopback)["spec"]["identify"]["headerFrom"] == "trustedProxiesOrLoopback"
    assert parse_policy(to_manifest(loopback)) == loopback
    # the default is left out, so that a sidecar older than the field still reads the document
    default = parse_policy(minimal(identify={"order": ["header", "ip"], "header": "X-User-Id"}))
    assert "headerFrom" not in to_manifest(default)["spec"]["identify"]
    assert parse_policy(to_manifest(default)) == default


@pytest.mark.parametrize("path", sorted((EXAMPLES / "bad").glob("*.yaml")), ids=lambda p: p.name)
def test_bad_examples_fail_with_their_documented_message(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), "every bad example documents its expected error"
    expected = first.removeprefix("# expect: ")
    with pytest.raises(PolicyErrors) as info:
        load_policies(path)
    messages = [f"{e.path}: {e.reason}" for e in info.value.errors]
    assert any(m.startswith(expected) for m in messages), messages


def test_config_doc_round_trip_with_grants() -> None:
    from sluice_core.apikeys import parse_grants

    p = load_policies(EXAMPLES / "public-api.yaml")[0]
    grants = parse_grants({"keys": {"secret-one": "pro", "sha256:" + "a" * 64: {"tier": "enterprise",
                                   "limit": {"requests": 3, "period": "1s"}}}}, p)
    doc = build_doc("default", [p], {p.name: grants})
    assert "secret-one" not in doc  # only digests are stored
    cfg = load_doc(doc, 7)
    assert cfg.version == 7 and cfg.policies == (p,)
    assert cfg.grants[p.name] == grants


def test_keys_file_errors_never_echo_the_key() -> None:
    from sluice_core.apikeys import parse_grants

    p = load_policies(EXAMPLES / "public-api.yaml")[0]
    with pytest.raises(PolicyErrors) as info:
        parse_grants({"keys": {"super-secret-value": "platinum"}}, p)
    assert "super-secret-value" not in str(info.value)
    assert "keys[0].tier: must name a tier of policy public-api" in str(info.value)


def test_broken_config_doc_is_refused() -> None:
    with pytest.raises(PolicyErrors, match="not valid JSON"):
        load_doc("{nope", 1)
    with pytest.raises(PolicyErrors, match="schema: must be 1"):
        load_doc('{"schema": 99}', 1)
    p = load_policies(EXAMPLES / "public-api.yaml")[0]
    doc = yaml.safe_load(build_doc("default", [p]))
    bad = copy.deepcopy(doc)
    bad["policies"][0]["spec"]["tiers"][0]["requests"] = 0
    with pytest.raises(PolicyErrors, match=r"spec.tiers\[0\].requests"):
        load_doc(json.dumps(bad), 2)
