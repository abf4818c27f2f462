"""Docs live with the code: every flag, env var and metric is in the README, whose settings
tables are made from the settings dataclasses; the chart documents every setting it sets."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from sluice_core.settingsform import env_name
from sluice_core.sidecar_settings import SidecarSettings
from sluice_sidecar.cli import add_arguments
from sluice_sidecar.metrics import Metrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_and_env_var_is_documented() -> None:
    for f in fields(SidecarSettings):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`{env_name(SidecarSettings, f.name)}`" in README, env_name(SidecarSettings, f.name)


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


def test_every_operator_flag_and_env_var_is_documented() -> None:
    from sluice_operator import cli as operator_cli

    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert "--redis" in flags
    for flag in flags:
        assert f"`{flag}" in README, flag
    source = Path(operator_cli.__file__).read_text()
    helps = " ".join(a.help or "" for a in parser._actions)
    envs = set(re.findall(r"SLUICE_OPERATOR_[A-Z_]+", source)) | set(
        re.findall(r"\[env (SLUICE_OPERATOR_[A-Z_]+)", helps))
    assert {"SLUICE_OPERATOR_SIDECAR_RESOURCES", "SLUICE_OPERATOR_SIDECAR_ENV"} <= envs  # help texts too
    for env in envs:
        assert f"`{env}`" in README, env


# ---------------------------------------------------------------------------------------------
# the settings reference tables are made from the settings dataclasses (hack/settings_tables.py)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/sluice"


def settings_tables() -> Any:
    """hack/settings_tables.py, the script that rewrites README.md's tables."""
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "hack/settings_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["sidecar", "operator", "injector"])
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


def test_the_chart_documents_every_injector_and_operator_setting_it_sets() -> None:
    """Every ``--sidecar-*`` flag has its chart value, documented in charts/sluice/README.md
    (naming the flag, and the sidecar's default where unset leaves the sidecar's) and in
    values.schema.json, and passed by the Deployment template; so are the operator's flags with
    a chart value."""
    from sluice_core.settingsform import flags
    from sluice_operator.injection.settings import InjectionSettings
    from sluice_operator.settings import OperatorSettings

    rows = chart_rows()
    schema = json.loads((CHART / "values.schema.json").read_text())
    template = (CHART / "templates/deployment.yaml").read_text()
    for flag in flags(InjectionSettings):
        chart = flag.doc.chart
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
