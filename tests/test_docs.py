"""Docs live with the code: every sidecar flag, env var and metric is in the README."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.settings import SidecarSettings, add_arguments, env_name

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_and_env_var_is_documented() -> None:
    for f in fields(SidecarSettings):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`{env_name(f.name)}`" in README, env_name(f.name)


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
