"""Docs live with the code: every flag, env var and metric is in the README, whose settings
tables are made from the settings dataclasses; the chart documents every setting it sets."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from sluice_analytics import cli as analytics_cli
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_core.settingsform import Flag, flags
from sluice_operator import cli as operator_cli
from sluice_operator.injection.settings import RESERVED_ENV, InjectionSettings
from sluice_operator.settings import OperatorSettings
from sluice_sidecar.cli import add_arguments
from sluice_sidecar.metrics import Metrics
from support.chart import CHART
from support.paths import ROOT

README = (ROOT / "README.md").read_text()


def test_env_vars_set_flag_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_REDIS_TIMEOUT_MS", "17")
    monkeypatch.setenv("SLUICE_UPSTREAM", "http://127.0.0.1:1")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--policy-file", "p.yaml"])
    assert args.redis_timeout_ms == 17
    assert args.upstream == "http://127.0.0.1:1"
    assert parser.parse_args(["--redis-timeout-ms", "5"]).redis_timeout_ms == 5  # flag wins


def test_every_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()} | {"sluice_redis_decisions", "sluice_redis_batches"}
    for name in names:
        suffixed = name + "_total" if f"`{name}_total`" in README else name
        assert f"`{suffixed}`" in README, name
    documented = set(re.findall(r"^\| `(sluice_[a-z_]+)`", README, re.M))
    assert documented, "the metrics table is missing"


def test_every_collector_metric_is_documented() -> None:
    for metric in AnalyticsMetrics().registry.collect():
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        assert f"`{name}`" in README, name


def test_the_commands_take_only_flags_their_tables_document() -> None:
    """The parsers of ``sluice sidecar`` and ``sluice operator`` add no flag beside the settings
    forms (whose README tables the test below checks)."""
    tables = settings_tables()
    documented = {row.split("`")[1] for name in tables.TABLES for row in tables.table(name)[2:]}
    for add in (add_arguments, operator_cli.add_arguments, analytics_cli.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        taken = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert taken <= documented, taken - documented


# ---------------------------------------------------------------------------------------------
# the settings reference tables are made from the settings dataclasses (hack/settings_tables.py)

def settings_tables() -> Any:
    """hack/settings_tables.py, the script that rewrites README.md's tables."""
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "hack/settings_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["sidecar", "operator", "injector", "analytics"])
def test_readme_settings_tables_are_the_dataclasses(name: str) -> None:
    tables = settings_tables()
    found = tables.marked(name).search(README)
    assert found, f"README.md has no <!-- settings:{name} --> table"
    documented = found[2].splitlines()
    made = tables.table(name)
    for row in made:
        assert row in documented, (f"README.md's {name} table lacks or differs in this row "
                                   f"(run python hack/settings_tables.py):\n{row}")
    for row in documented:
        assert row in made, f"README.md's {name} table has a row no setting gives:\n{row}"
    assert documented == made, f"README.md's {name} table is out of order (run python hack/settings_tables.py)"


def chart_rows() -> dict[str, str]:
    """charts/sluice/README.md's values table: each value named in a row's first cell -> the row."""
    rows: dict[str, str] = {}
    for line in (CHART / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for value in re.findall(r"`([a-zA-Z.]+)`", first):
                parts = value.split(".")  # `sidecar.redisSecret.name` documents sidecar.redisSecret
                for n in range(2, len(parts) + 1):
                    rows.setdefault(".".join(parts[:n]), line)
    return rows


DERIVED = {"--sidecar-redis-ca-file": "externalRedis.tls.caSecret"}
"""Injector flags the chart derives from a value outside ``sidecar.`` (the CA's mounted path)."""


def test_the_chart_documents_every_injector_and_operator_setting_it_sets() -> None:
    """Every ``--sidecar-*`` flag has its chart value, documented in charts/sluice/README.md
    (naming the flag, and the sidecar's default where unset leaves the sidecar's) and in
    values.schema.json, and passed by the Deployment template; so are the operator's flags with
    a chart value."""
    rows = chart_rows()
    schema = json.loads((CHART / "values.schema.json").read_text())
    template = (CHART / "templates/deployment.yaml").read_text()
    for flag in flags(InjectionSettings):
        chart = flag.doc.chart
        if flag.name in DERIVED:  # set from another value, which the row of that value names
            assert chart == DERIVED[flag.name] and f"`{flag.name}`" in rows[chart], flag.name
            assert f"- {flag.name}=" in template, f"the Deployment template never passes {flag.name}"
            continue
        assert chart and chart.startswith("sidecar."), f"{flag.name} has no chart value"
        assert chart in rows, f"charts/sluice/README.md has no row for {chart} ({flag.name})"
        assert f"`{flag.name}" in rows[chart], f"charts/sluice/README.md's {chart} row does not name {flag.name}"
        shown = flag.shown_default() or ""
        if shown.startswith("the sidecar's, "):
            default = shown.removeprefix("the sidecar's, ")
            assert f"sidecar's {default}" in rows[chart].replace("`", ""), \
                f"charts/sluice/README.md's {chart} row does not give the sidecar's default {default}"
        key = chart.split(".")[1]
        prop = schema["properties"]["sidecar"]["properties"].get(key)
        assert prop and prop.get("description"), f"values.schema.json has no description for {chart}"
        assert f"- --{flag.name.removeprefix('--')}=" in template or f'"{flag.name}=' in template, \
            f"the Deployment template never passes {flag.name}"
    for flag in flags(OperatorSettings):
        if flag.doc.chart:
            assert flag.doc.chart in rows, f"charts/sluice/README.md has no row for {flag.doc.chart}"
            row = rows[flag.doc.chart]
            assert f"`{flag.name}`" in row or f"`{flag.env}`" in row, \
                f"charts/sluice/README.md's {flag.doc.chart} row names neither {flag.name} nor {flag.env}"


# ---------------------------------------------------------------------------------------------
# the chart's values: what they allow, their defaults and the comments beside them


def chart_flags() -> Iterator[Flag]:
    """The operator's and the injector's flags that a chart value sets."""
    for cls in (OperatorSettings, InjectionSettings):
        yield from (flag for flag in flags(cls) if flag.doc.chart)


def schema_of(chart: str) -> dict[str, Any]:
    node: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    for key in chart.split("."):
        node = node["properties"][key]
    return node


def value_of(chart: str) -> Any:
    node: Any = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in chart.split("."):
        node = node[key]
    return node


def values_comments() -> dict[str, str]:
    """values.yaml's comment above each value (``sidecar.logLevel`` -> its words on one line)."""
    comments: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    above: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        found = re.match(r"( *)([A-Za-z]+):", line)
        if found:
            indent = len(found[1])
            path = [(i, k) for i, k in path if i < indent] + [(indent, found[2])]
            comments[".".join(k for _, k in path)] = " ".join(above)
        above = []
    return comments


def test_the_flags_take_every_value_the_chart_allows() -> None:
    """Each enum value of a chart value is accepted by the flag the Deployment passes it to, and
    each choice of the flag is allowed by the chart (the schema must not let `helm upgrade`
    through with a value at which every replica exits)."""
    for flag in chart_flags():
        schema = schema_of(flag.doc.chart or "")
        allowed = [v for v in schema.get("enum", ()) if v not in (None, "")]  # empty: the default
        for value in allowed:
            parser = argparse.ArgumentParser()
            operator_cli.add_arguments(parser)
            args = parser.parse_args(["--redis", "redis://redis:6379", f"{flag.name}={value}"])
            try:
                operator_cli.settings_from_args(args)
            except SystemExit as exc:
                pytest.fail(f"{flag.doc.chart} allows {value!r}, {flag.name} refuses it: {exc}")
        if allowed:
            assert set(flag.doc.choices) <= set(allowed), f"{flag.doc.chart} refuses a choice of {flag.name}"


def test_the_charts_defaults_are_the_settings_defaults() -> None:
    """A value values.yaml sets is the setting's own default (so `helm install` and the operator
    agree; a changed default must change both), and its row in charts/sluice/README.md shows it;
    a value left empty says the sidecar's default, as the setting does."""
    comments = values_comments()
    rows = chart_rows()
    for flag in chart_flags():
        chart = flag.doc.chart or ""
        value, comment = value_of(chart), comments[chart]
        default_cell = rows[chart].split("|")[2]
        shown = flag.shown_default() or ""
        sidecars = shown.startswith("the sidecar's, ")  # unset: the sidecar's default applies
        default = shown.removeprefix("the sidecar's, ") if sidecars else str(flag.default)
        for said in re.findall(r"default \(([-\w.]+)\)", comment):  # (500), not (the same as here)
            assert said == default, f"values.yaml says {chart}'s default is {said}, the setting's is {default}"
        if flag.required or (isinstance(value, dict) and not isinstance(flag.default, dict)):
            continue  # redis.url: no default; sidecar.redisSecret: NAME/KEY made by the template
        if value in (None, ""):
            if sidecars:
                assert f"default ({default})" in comment, f"values.yaml does not say {chart}'s default"
            continue
        assert value == flag.default, f"values.yaml's {chart} is {value!r}, {flag.name}'s default {flag.default!r}"
        quantities = re.findall(r"[0-9]+[A-Za-z]*", json.dumps(value)) if isinstance(value, dict) else [f"`{value}`"]
        for shown in quantities:
            assert shown in default_cell, f"charts/sluice/README.md's {chart} default lacks {shown}"


def test_the_reserved_env_names_are_listed_where_sidecar_env_is_described() -> None:
    """README.md's list (made by hack/settings_tables.py) and values.yaml's comment on
    ``sidecar.env`` name exactly the variables the injector refuses."""
    tables = settings_tables()
    found = tables.marked("reserved-env").search(README)
    assert found, "README.md has no <!-- settings:reserved-env --> list"
    assert found[2].splitlines() == tables.reserved_env(), \
        "README.md's list of the variables --sidecar-env refuses is stale (run python hack/settings_tables.py)"
    named = set(re.findall(r"\b(?:SLUICE_[A-Z_]+|POD_NAME(?:SPACE)?)\b", values_comments()["sidecar.env"]))
    assert named == set(RESERVED_ENV), f"values.yaml's sidecar.env comment differs in {named ^ set(RESERVED_ENV)}"


def value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """values.yaml's values as dotted paths; a map of free-form entries (env, resources, labels,
    selectors) is one value."""
    free = {"env", "resources", "podLabels", "podAnnotations", "nodeSelector", "affinity", "global"}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in free:
            yield from value_paths(value, path + ".")
        else:
            yield path


def test_the_chart_readme_and_schema_describe_every_value() -> None:
    """Every value of values.yaml has a row in charts/sluice/README.md's table and a schema entry
    (with a description where it is new to this table's checks), so none is undocumented."""
    rows = {value for line in (CHART / "README.md").read_text().splitlines() if line.startswith("| `")
            for value in re.findall(r"`([a-zA-Z.]+)`", line.split("|")[1])}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = list(value_paths(values))
    assert "redis.persistence.storageClass" in paths and "networkPolicy.webhookFrom" in paths
    missing = [p for p in paths if p not in rows and p.split(".")[0] not in
               ("podLabels", "podAnnotations", "nodeSelector", "tolerations")]
    assert not missing, f"charts/sluice/README.md's values table lacks {missing}"
    for path in paths:
        node = schema_of(path)  # KeyError: values.schema.json lacks it
        top = path.split(".")[0]
        if top in ("redis", "externalRedis", "analytics", "networkPolicy"):
            assert node.get("description") or "enum" in node, f"values.schema.json: {path} has no description"
