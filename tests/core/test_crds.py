"""The CRDs in crds/: valid and structural, in step with parse.py, the README and the examples.

No API server runs here, so the CRD's two layers of validation are checked separately:

* the structural OpenAPI schema, converted to JSON Schema and run with ``jsonschema`` (unknown
  fields are refused, as ``kubectl apply``'s default strict field validation does);
* the CEL rules (``x-kubernetes-validations``), mirrored by the Python predicates in
  ``CEL_MIRRORS`` and evaluated on every instance of the schema node that carries the rule,
  after the schema's defaults are applied (the API server runs CEL on the defaulted object).

Every bad example states, on its second line ``# expect-crd: <message>``, what the API server
answers (recorded from a real kube-apiserver): a schema error, a CEL rule's message, or
``(webhook) ...`` when the CRD cannot express the check and only the admission webhook (the same
code as ``sluice check``) refuses it.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import kubernetes_validate
import pytest
import yaml
from sluice_core import parse as parse_module
from sluice_core import usagesummary
from sluice_core.duration import parse_duration_us
from sluice_core.errors import PolicyErrors
from sluice_core.parse import parse_policy
from support.examples import k8s_version
from support.paths import ROOT

CRDS = {
    "RateLimitPolicy": ROOT / "crds" / "sluice.dev_ratelimitpolicies.yaml",
    "ClusterRateLimitPolicy": ROOT / "crds" / "sluice.dev_clusterratelimitpolicies.yaml",
}
EXAMPLES = ROOT / "crds" / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BAD = sorted((EXAMPLES / "bad").glob("*.yaml"))
# Bad examples the CRD accepts: only the validating webhook / `sluice check` refuses them.
WEBHOOK_ONLY = {"bad-regex.yaml", "regex-backreference.yaml"}

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# helpers


@functools.cache
def load_crd(kind: str) -> Json:
    """The CRD document (cached: callers must not mutate it)."""
    docs = [d for d in yaml.safe_load_all(CRDS[kind].read_text()) if d]
    assert len(docs) == 1, f"{CRDS[kind].name}: one document expected"
    doc: Json = docs[0]
    return doc


def root_schema(kind: str) -> Json:
    (version,) = load_crd(kind)["spec"]["versions"]
    schema: Json = version["schema"]["openAPIV3Schema"]
    return schema


def load_example(path: Path) -> Json:
    doc: Json = yaml.safe_load(path.read_text())
    return doc


def walk(node: Json, path: str = "") -> Iterator[tuple[str, Json]]:
    """Every schema node with its path: ``spec.tiers[].name``; map values are ``{}``."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def instances(doc: Any, path: str) -> Iterator[tuple[str, Any]]:
    """The values in ``doc`` at a schema path, each with its concrete path (``spec.rules[1]``)."""
    parts = re.findall(r"[^.\[\]{}]+|\[\]|\{\}", path)

    def go(value: Any, rest: list[str], where: str) -> Iterator[tuple[str, Any]]:
        if not rest:
            yield where, value
            return
        head, tail = rest[0], rest[1:]
        if head == "[]":
            for i, item in enumerate(value if isinstance(value, list) else []):
                yield from go(item, tail, f"{where}[{i}]")
        elif head == "{}":
            for k, item in (value.items() if isinstance(value, dict) else []):
                yield from go(item, tail, f"{where}.{k}")
        elif isinstance(value, dict) and head in value:
            yield from go(value[head], tail, f"{where}.{head}" if where else head)

    yield from go(doc, parts, "")


def to_jsonschema(node: Json) -> Json:
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema, mirroring what the API server enforces."""
    out: Json = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description"):
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        types = out.get("type", [])
        out["type"] = [*(types if isinstance(types, list) else [types]), "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False  # strict field validation (kubectl's default)
    return out


def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(root_schema(kind)))


def apply_defaults(node: Json, value: Any) -> Any:
    """The API server's structural defaulting: absent fields with a default get it, recursively."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        value = {k: apply_defaults(node["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def json_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def apiserver_messages(error: jsonschema.ValidationError) -> set[str]:
    """The message kube-apiserver gives for the same schema violation (recorded formats)."""
    path, value, arg = json_path(error.absolute_path), error.instance, error.validator_value
    v = json.dumps(value)
    if error.validator == "minimum":
        return {f"{path}: Invalid value: {v}: {path} in body should be greater than or equal to {arg}"}
    if error.validator == "maximum":
        return {f"{path}: Invalid value: {v}: {path} in body should be less than or equal to {arg}"}
    if error.validator == "pattern":
        return {f"{path}: Invalid value: {v}: {path} in body should match '{arg}'"}
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(a) for a in arg)
        return {f"{path}: Unsupported value: {v}: supported values: {allowed}"}
    if error.validator == "additionalProperties":
        extra = set(value) - set(error.schema.get("properties", {}))
        return {f'strict decoding error: unknown field "{path}.{k}"' for k in extra}
    return {f"{path}: {error.validator}: {error.message}"}


def expect_lines(path: Path) -> tuple[str, str]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    assert len(lines) > 1 and lines[1].startswith("# expect-crd: "), (
        f"{path.name}: second line must be '# expect-crd: <API server message>'")
    return lines[0].removeprefix("# expect: "), lines[1].removeprefix("# expect-crd: ")


# ---------------------------------------------------------------------------------------------
# CEL rules, mirrored in Python. Each predicate receives `self` (the value at the schema node that
# carries the rule, after defaulting) and returns whether the rule holds.


def _unique(items: list[Any], key: Callable[[Any], Any]) -> bool:
    keys = [key(x) for x in items]
    return len(keys) == len(set(keys))


def _burst(limit: Json) -> int:
    return int(limit["burst"]) if "burst" in limit else int(limit["requests"])


class Mirror(NamedTuple):
    rule: str  # the CEL text in the CRD: changing it means reviewing the predicate too
    holds: Callable[[Any], bool]


CEL_MIRRORS: dict[str, Mirror] = {
    "spec.defaultTier must name a declared tier in spec.tiers": Mirror(
        "!has(self.defaultTier) || self.tiers.exists(t, t.name == self.defaultTier)",
        lambda s: "defaultTier" not in s or any(t["name"] == s["defaultTier"] for t in s["tiers"])),
    "spec.apiKeys.required is true but 'apiKey' is not in spec.identify.order": Mirror(
        "!has(self.apiKeys) || !has(self.apiKeys.required) || !self.apiKeys.required || "
        "(has(self.identify) && has(self.identify.order) ? 'apiKey' in self.identify.order : true)",
        lambda s: not s.get("apiKeys", {}).get("required", False)
        or "apiKey" in s.get("identify", {}).get("order", ["apiKey"])),
    "spec.rules[].cost must not exceed the burst (default: requests) of any tier: "
    "those clients could never pass": Mirror(
        "!has(self.rules) || self.rules.all(r, (has(r.skip) && r.skip) || !has(r.cost) || "
        "self.tiers.all(t, r.cost <= (has(t.burst) ? t.burst : t.requests)))",
        lambda s: all(r.get("skip", False) or "cost" not in r
                      or all(r["cost"] <= _burst(t) for t in s["tiers"])
                      for r in s.get("rules", []))),
    "spec.alerts[].tiers must name declared tiers in spec.tiers": Mirror(
        "!has(self.alerts) || self.alerts.all(a, !has(a.tiers) || a.tiers.all(n, self.tiers.exists(t, "
        "t.name == n)))",
        lambda s: all(any(t["name"] == n for t in s["tiers"]) for a in s.get("alerts", []) for n in a.get("tiers", []))),
    "spec.alerts[].webhook must set exactly one of url and secretRef": Mirror(
        "has(self.url) != has(self.secretRef)",
        lambda w: ("url" in w) != ("secretRef" in w)),
    "spec.tiers[].name must be unique": Mirror(
        "self.all(t, self.exists_one(u, u.name == t.name))",
        lambda a: _unique(a, lambda t: t["name"])),
    "spec.rules[].name must be unique": Mirror(
        "self.all(r, self.exists_one(u, u.name == r.name))",
        lambda a: _unique(a, lambda r: r["name"])),
    "spec.identify.order must not list a source twice": Mirror(
        "self.all(x, self.exists_one(y, y == x))",
        lambda a: _unique(a, lambda x: x)),
    "spec.identify.header is required when 'header' is in spec.identify.order": Mirror(
        "!(has(self.order) && 'header' in self.order) || has(self.header)",
        lambda o: "header" not in o.get("order", []) or "header" in o),
    "spec.identify.header is set but 'header' is not in spec.identify.order": Mirror(
        "!has(self.header) || (has(self.order) && 'header' in self.order)",
        lambda o: "header" not in o or "header" in o.get("order", [])),
    "spec.rules[].skip: a skipped rule cannot also set limit or cost": Mirror(
        "!(has(self.skip) && self.skip) || (!has(self.limit) && !has(self.cost))",
        lambda r: not r.get("skip", False) or ("limit" not in r and "cost" not in r)),
    "spec.rules[] must set at least one of limit, cost or skip": Mirror(
        "has(self.limit) || has(self.cost) || (has(self.skip) && self.skip)",
        lambda r: "limit" in r or "cost" in r or r.get("skip", False)),
    "spec.rules[].cost must not exceed the rule's own burst (default: requests): "
    "no request could ever pass": Mirror(
        "!has(self.cost) || !has(self.limit) || "
        "self.cost <= (has(self.limit.burst) ? self.limit.burst : self.limit.requests)",
        lambda r: "cost" not in r or "limit" not in r or r["cost"] <= _burst(r["limit"])),
    "spec.rules[].match must set path, methods or both": Mirror(
        "has(self.path) || has(self.methods)",
        lambda m: "path" in m or "methods" in m),
    "spec.rules[].match.path must set exactly one of exact, prefix, regex": Mirror(
        "(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1",
        lambda p: sum(k in p for k in ("exact", "prefix", "regex")) == 1),
    "matchExpressions[].values must be non-empty for operator In and NotIn, "
    "and empty for Exists and DoesNotExist": Mirror(
        "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) "
        ": (!has(self.values) || size(self.values) == 0)",
        lambda e: bool(e.get("values")) == (e["operator"] in ("In", "NotIn"))),
    # The CEL regex is parse.py's own label-key pattern (see test_patterns_are_parse_patterns).
    "matchLabels keys must be valid Kubernetes label keys ([prefix/]name)": Mirror(
        f"self.all(k, k.size() <= 317 && k.matches('^{parse_module._LABEL_KEY.pattern}$'))",
        lambda m: all(len(k) <= 317 and parse_module._LABEL_KEY.fullmatch(k) for k in m)),
}


@functools.cache
def cel_rules(kind: str) -> list[tuple[str, Json]]:
    """(schema path, rule) for every x-kubernetes-validations rule in the CRD."""
    return [(path, rule) for path, node in walk(root_schema(kind))
            for rule in node.get("x-kubernetes-validations", [])]


def cel_failures(kind: str, doc: Json) -> set[tuple[str, str]]:
    """(error path as the API server reports it, message) for every mirrored rule that fails."""
    defaulted = apply_defaults(root_schema(kind), doc)
    failures = set()
    for path, rule in cel_rules(kind):
        mirror = CEL_MIRRORS[rule["message"]]
        for where, value in instances(defaulted, path):
            if not mirror.holds(value):
                failures.add((where + rule.get("fieldPath", ""), rule["message"]))
    return failures


# ---------------------------------------------------------------------------------------------
# (a) the CRDs themselves


@pytest.mark.parametrize("kind", CRDS)
def test_crd_passes_kubernetes_validate(kind: str) -> None:
    doc = load_crd(kind)
    for version in (k8s_version(), kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any problem


@pytest.mark.parametrize("kind", CRDS)
def test_crd_is_structural_bounded_and_documented(kind: str) -> None:
    problems = []
    for path, node in walk(root_schema(kind)):
        where = path or "(root)"
        if path == "metadata":  # the API server allows nothing but name/generateName here
            assert node == {"type": "object"}, node
            continue
        if node.get("x-kubernetes-int-or-string"):
            if "type" in node:
                problems.append(f"{where}: int-or-string must not set type")
        elif node.get("type") not in ("object", "array", "string", "integer", "number", "boolean"):
            problems.append(f"{where}: no type")
        for junctor in ("anyOf", "oneOf", "allOf", "not", "$ref"):
            if junctor in node:
                problems.append(f"{where}: {junctor} is not used in a structural schema here")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties together")
        if ("properties" in node or "additionalProperties" in node) and node["type"] != "object":
            problems.append(f"{where}: properties on a non-object")
        if ("items" in node) != (node.get("type") == "array"):
            problems.append(f"{where}: items iff array")
        if not str(node.get("description", "")).strip():
            problems.append(f"{where}: no description")
        # Bounded sizes keep the estimated CEL cost within the API server's budget.
        if node.get("type") == "array" and "maxItems" not in node:
            problems.append(f"{where}: array without maxItems")
        if (node.get("type") == "string" or node.get("x-kubernetes-int-or-string")) and not (
                "maxLength" in node or "enum" in node or path in ("apiVersion", "kind")):
            problems.append(f"{where}: string without maxLength or enum")
        if isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            problems.append(f"{where}: map without maxProperties")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{where}: required {name!r} is not a property")
        if "default" in node:
            sub = jsonschema.Draft202012Validator(to_jsonschema(node))
            for err in sub.iter_errors(apply_defaults(node, node["default"])):
                problems.append(f"{where}: default {node['default']!r} invalid: {err.message}")
        for rule in node.get("x-kubernetes-validations", []):
            if not rule.get("message"):
                problems.append(f"{where}: CEL rule without message: {rule['rule']}")
    assert not problems, "\n".join(problems)


def test_names_scope_and_versions() -> None:
    expected = {"RateLimitPolicy": ("Namespaced", "rlp", "ratelimitpolicies"),
                "ClusterRateLimitPolicy": ("Cluster", "crlp", "clusterratelimitpolicies")}
    for kind, (scope, short, plural) in expected.items():
        crd = load_crd(kind)
        spec = crd["spec"]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{plural}.sluice.dev"
        assert spec["group"] == "sluice.dev" and spec["scope"] == scope
        assert spec["names"]["kind"] == kind and spec["names"]["plural"] == plural
        assert spec["names"]["shortNames"] == [short]
        assert spec["names"]["categories"] == ["sluice"]
        (version,) = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", CRDS)
def test_printer_columns(kind: str) -> None:
    (version,) = load_crd(kind)["spec"]["versions"]
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    cluster = kind == "ClusterRateLimitPolicy"
    assert columns == [
        ("Mode", "string", ".spec.mode"),
        ("Tiers", "integer", ".status.tiers"),
        *([("Namespaces", "integer", ".status.namespaces")] if cluster else []),
        ("Programmed", "string", '.status.conditions[?(@.type=="Programmed")].status'),
        ("Enforced", "integer", ".status.enforcedSidecars"),
        ("Requests/1h", "integer", ".status.usage.requestsLastHour"),
        ("Limited/1h", "integer", ".status.usage.limitedLastHour"),
        ("Age", "date", ".metadata.creationTimestamp"),
        ("Most-Limited", "string", ".status.usage.topLimited[0].client"),  # -o wide (priority 1)
    ]
    schema = root_schema(kind)
    paths = {p for p, _ in walk(schema)}
    assert {"spec.mode", "status.tiers", "status.enforcedSidecars", "status.conditions[].type",
            "status.conditions[].status"} <= paths
    status = schema["properties"]["status"]["properties"]
    assert {k: status[k]["type"] for k in status} == {
        "conditions": "array", "observedGeneration": "integer", "configVersion": "integer",
        "enforcedSidecars": "integer", "tiers": "integer", "keys": "integer", "usage": "object",
        **({"namespaces": "integer"} if cluster else {})}
    usage = status["usage"]["properties"]
    assert set(usage) == {"requestsLastHour", "limitedLastHour", "topLimited"}
    assert usage["topLimited"]["maxItems"] == usagesummary.TOP
    client = usage["topLimited"]["items"]["properties"]["client"]
    assert client["maxLength"] == usagesummary.MAX_CLIENT
    # The CRD's pattern admits exactly the alphabet the operator reduces client ids to.
    allowed = {chr(c) for c in range(32, 127) if re.fullmatch(client["pattern"], chr(c))}
    assert allowed == set(usagesummary.CLIENT_CHARS)
    condition = status["conditions"]["items"]
    assert set(condition["properties"]) == {"type", "status", "reason", "message",
                                            "lastTransitionTime", "observedGeneration"}
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_cluster_crd_spec_is_the_namespaced_one_plus_namespace_selector() -> None:
    ns_spec = root_schema("RateLimitPolicy")["properties"]["spec"]
    cl_spec = copy.deepcopy(root_schema("ClusterRateLimitPolicy")["properties"]["spec"])
    ns_sel = cl_spec["properties"].pop("namespaceSelector")
    assert ns_sel["properties"] == ns_spec["properties"]["selector"]["properties"]
    ns_spec = copy.deepcopy(ns_spec)
    for spec in (ns_spec, cl_spec):
        spec["properties"]["selector"].pop("description")
    assert cl_spec == ns_spec


# ---------------------------------------------------------------------------------------------
# (b) good examples


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_example_passes_schema_and_cel(path: Path) -> None:
    doc = load_example(path)
    kind = doc["kind"]
    errors = [f"{json_path(e.absolute_path)}: {e.message}" for e in validator(kind).iter_errors(doc)]
    assert not errors, errors
    assert not cel_failures(kind, doc)
    parse_policy(doc)  # and `sluice check` accepts it


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_crd_defaults_do_not_change_the_policy(path: Path) -> None:
    """The API server stores the defaulted object; Sluice must read the same policy from it."""
    doc = load_example(path)
    defaulted = apply_defaults(root_schema(doc["kind"]), doc)
    assert defaulted != doc  # defaults really are exercised
    assert parse_policy(defaulted) == parse_policy(doc)


def test_there_is_a_cluster_policy_example() -> None:
    kinds = {load_example(p)["kind"] for p in GOOD}
    assert kinds == set(CRDS)


# ---------------------------------------------------------------------------------------------
# (c) bad examples


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_example_is_refused_by_the_crd_as_documented(path: Path) -> None:
    expected_check, expected_crd = expect_lines(path)
    doc = load_example(path)
    kind = doc["kind"]
    schema_messages = set()
    for error in validator(kind).iter_errors(doc):
        schema_messages |= apiserver_messages(error)
    cel = cel_failures(kind, doc)
    cel_messages = {f'{where}: Invalid value: "{_cel_type(doc, kind, where, msg)}": {msg}'
                    for where, msg in cel}
    if expected_crd.startswith("(webhook)"):
        assert path.name in WEBHOOK_ONLY, f"{path.name}: the CRD should refuse it"
        assert not schema_messages and not cel, (schema_messages, cel)
    elif any(expected_crd.endswith(m) for m in CEL_MIRRORS):
        assert not schema_messages, f"the schema already refuses it: {schema_messages}"
        assert cel_messages == {expected_crd}, cel_messages
    else:
        assert expected_crd in schema_messages, schema_messages
        assert not cel, f"a CEL rule fails too: {cel}"
    # and `sluice check` (= the webhook) refuses it with its documented message
    with pytest.raises(PolicyErrors) as info:
        parse_policy(doc)
    assert any(f"{e.path}: {e.reason}".startswith(expected_check) for e in info.value.errors)


def _cel_type(doc: Json, kind: str, where: str, message: str) -> str:
    """The API server reports a failed rule's `self` by type: "object" or "array"."""
    for path, rule in cel_rules(kind):
        if rule["message"] == message:
            for concrete, value in instances(apply_defaults(root_schema(kind), doc), path):
                if concrete + rule.get("fieldPath", "") == where:
                    return "array" if isinstance(value, list) else "object"
    raise AssertionError(where)


@pytest.mark.parametrize("kind", CRDS)
def test_every_cel_rule_is_mirrored_and_exercised_by_exactly_its_bad_examples(kind: str) -> None:
    messages = {rule["message"] for _, rule in cel_rules(kind)}
    assert messages == set(CEL_MIRRORS), "a CEL rule without a Python mirror, or a stale mirror"
    for _, rule in cel_rules(kind):
        assert rule["rule"] == CEL_MIRRORS[rule["message"]].rule, (
            f"CEL rule changed: update its Python mirror too: {rule['message']!r}")
    bad = [(p, load_example(p)) for p in BAD]
    for message in messages:
        failing = {p.name for p, doc in bad if any(m == message for _, m in cel_failures(kind, doc))}
        documented = {p.name for p in BAD if expect_lines(p)[1].endswith(message)}
        assert documented, f"no bad example exercises CEL rule {message!r}"
        assert failing == documented, (message, failing, documented)


def test_patterns_are_parse_patterns() -> None:
    """Names, header names and label keys: the CRD's patterns are parse.py's own regexes."""
    expected = {
        "name": parse_module._NAME, "defaultTier": parse_module._NAME,
        "header": parse_module._HEADER_NAME, "key": parse_module._LABEL_KEY,
    }
    secret_ref = "spec.alerts[].webhook.secretRef"  # a Secret's name and key, not a label's
    by_path = {f"{secret_ref}.name": parse_module._DNS_SUBDOMAIN, f"{secret_ref}.key": parse_module._SECRET_KEY}
    for kind in CRDS:
        for path, node in walk(root_schema(kind)):
            want = by_path.get(path) or expected.get(path.rsplit(".", 1)[-1])
            if want is not None and "pattern" in node:
                assert node["pattern"] == f"^{want.pattern}$", path
    checked = {p for p, n in walk(root_schema("RateLimitPolicy")) if "pattern" in n}
    assert {"spec.tiers[].name", "spec.rules[].name", "spec.defaultTier", "spec.identify.header",
            "spec.apiKeys.header", "spec.selector.matchExpressions[].key", *by_path} <= checked


@pytest.mark.parametrize("period", ["500ms", "1s", "1m", "1h", "1d", "1h30m", " 2s ", "60", "0.5",
                                    "366d", 1, 31_622_400])
def test_period_forms_accepted_by_parse_pass_the_schema(period: Any) -> None:
    node = root_schema("RateLimitPolicy")["properties"]["spec"]["properties"]["tiers"]["items"]
    period_schema = to_jsonschema(node["properties"]["period"])
    parse_duration_us(period)
    jsonschema.validate(period, period_schema)


@pytest.mark.parametrize("period", ["1 minute", "1w", "1.5m", "", "m", True, 0, 31_622_401])
def test_period_forms_refused_by_parse_fail_the_schema(period: Any) -> None:
    node = root_schema("RateLimitPolicy")["properties"]["spec"]["properties"]["tiers"]["items"]
    period_schema = to_jsonschema(node["properties"]["period"])
    with pytest.raises(ValueError):
        parse_duration_us(period)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(period, period_schema)


def test_cel_rules_use_only_bounded_inputs() -> None:
    """A cheap guard on the cost estimate: rules iterating lists sit where lists are bounded."""
    for kind in CRDS:
        schema = root_schema(kind)
        nodes = dict(walk(schema))
        for path, rule in cel_rules(kind):
            if ".all(" in rule["rule"] or ".exists" in rule["rule"]:
                node = nodes[path]
                assert "maxItems" in node or "maxProperties" in node or path == "spec", (path, rule)


# ---------------------------------------------------------------------------------------------
# (e) the schema's fields are exactly parse.py's fields


MAXIMAL: Json = {
    "apiVersion": "sluice.dev/v1alpha1",
    "kind": "ClusterRateLimitPolicy",
    "metadata": {"name": "maximal"},
    "spec": {
        "selector": {"matchLabels": {"app": "a"},
                     "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]},
        "namespaceSelector": {"matchLabels": {"team": "t"},
                              "matchExpressions": [{"key": "env", "operator": "Exists"}]},
        "identify": {"order": ["apiKey", "header", "ip"], "header": "X-Caller",
                     "headerFrom": "trustedProxiesOrLoopback",
                     "trustedProxies": ["10.0.0.0/8"], "ipv6PrefixLength": 56},
        "apiKeys": {"header": "X-API-Key", "required": True},
        "tiers": [{"name": "free", "requests": 10, "period": "1m", "burst": 10}],
        "defaultTier": "free",
        "rules": [
            {"name": "a", "match": {"path": {"exact": "/a"}, "methods": ["GET"]}, "cost": 2,
             "limit": {"requests": 5, "period": 60, "burst": 5}},
            {"name": "b", "match": {"path": {"prefix": "/b"}}, "skip": True},
            {"name": "c", "match": {"path": {"regex": "/c/.*"}}, "cost": 1},
        ],
        "failureMode": "closed", "mode": "shadow", "headers": "both", "usage": {"truncateIPs": True},
        "alerts": [{"name": "hourly", "percent": 80, "period": "hour", "tiers": ["free"],
                    "webhook": {"url": "https://hooks.example.com/sluice"}},
                   {"name": "daily", "percent": 90, "period": "day",
                    "webhook": {"secretRef": {"name": "chat-hook", "key": "url"}}}],
    },
    "status": {},
}


def _parse_fields(doc: Json, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, set[str]], set[int]]:
    """Fields parse.py allows at each path (from its `c.unknown(...)` calls) and the call lines."""
    seen: dict[str, set[str]] = {}
    lines: set[int] = set()
    original = parse_module.DocumentChecker.unknown

    def recording(self: Any, value: Any, path: str, allowed: set[str]) -> None:
        seen.setdefault(re.sub(r"\[\d+\]", "[]", path), set()).update(allowed)
        lines.add(sys._getframe(1).f_lineno)
        original(self, value, path, allowed)

    monkeypatch.setattr(parse_module.DocumentChecker, "unknown", recording)
    parse_policy(doc)
    monkeypatch.undo()
    return seen, lines


def _schema_fields(kind: str) -> dict[str, set[str]]:
    return {path: set(node["properties"]) for path, node in walk(root_schema(kind))
            if "properties" in node and not path.startswith("status")}


@pytest.mark.parametrize("kind", CRDS)
def test_schema_fields_equal_parse_fields(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = copy.deepcopy(MAXIMAL)
    doc["kind"] = kind
    if kind == "RateLimitPolicy":
        del doc["spec"]["namespaceSelector"]
    allowed, _ = _parse_fields(doc, monkeypatch)
    if kind == "RateLimitPolicy":
        # parse.py knows the field for both kinds and refuses it on the namespaced one
        allowed["spec"] = allowed["spec"] - {"namespaceSelector"}
        bad = copy.deepcopy(doc)
        bad["spec"]["namespaceSelector"] = {}
        with pytest.raises(PolicyErrors, match="only allowed on ClusterRateLimitPolicy"):
            parse_policy(bad)
    assert _schema_fields(kind) == allowed


def test_maximal_document_reaches_every_unknown_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new `c.unknown(...)` in parse.py that MAXIMAL does not reach fails here, not silently."""
    tree = ast.parse(inspect.getsource(parse_module))
    calls = {node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "unknown" and isinstance(node.func.value, ast.Name)
             and node.func.value.id == "c"}
    _, reached = _parse_fields(copy.deepcopy(MAXIMAL), monkeypatch)
    assert calls and reached == calls


# ---------------------------------------------------------------------------------------------
# the README's Reference table is the schema's documentation


def _readme_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### `RateLimitPolicy`", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `spec."):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows[cells[0].strip("`")] = cells
    return rows


def _documented_paths(kind: str) -> set[str]:
    """Schema paths the README documents one row each: leaves, arrays of objects, and whole
    selectors, path matches and limits (documented as a unit)."""
    units = ("selector", "namespaceSelector", "match.path", "limit")
    out = set()
    for path, node in walk(root_schema(kind)["properties"]["spec"], "spec"):
        if any(f".{u}." in path or f".{u}[" in path or f".{u}{{" in path for u in units):
            continue
        if node.get("type") == "array" and node["items"].get("type") == "object":
            out.add(f"{path}[]")
        elif path.endswith("[]") or ("properties" in node and not path.endswith(units)):
            continue
        else:
            out.add(path)
    return out


def test_readme_reference_documents_exactly_the_schema_fields() -> None:
    rows = _readme_rows()
    assert set(rows) == _documented_paths("RateLimitPolicy")
    assert "spec.namespaceSelector" in _documented_paths("ClusterRateLimitPolicy")


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def test_readme_defaults_and_enums_match_the_schema() -> None:
    rows = _readme_rows()
    nodes = dict(walk(root_schema("RateLimitPolicy")))
    for field, (_, type_cell, default_cell, _) in rows.items():
        node = nodes[field.removesuffix("[]")]
        if "default" in node:
            assert f"`{_render(node['default'])}`" in default_cell, (field, node["default"])
        for value in node.get("enum", []) + node.get("items", {}).get("enum", []):
            assert f"`{value}`" in type_cell, (field, value)
        if "maxItems" in node and field.endswith("[]"):
            assert str(node["maxItems"]) in type_cell, (field, node["maxItems"])
        if node.get("type") == "integer" and "minimum" in node:
            assert f"≥ {node['minimum']}" in type_cell, field
