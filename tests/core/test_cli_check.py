"""`sluice check`: offline validation with exit codes, as a user runs it; the subcommands other
packages register as entry points."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from sluice_core.cli import COMMANDS_GROUP, installed_commands, load_command
from support.paths import ROOT


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sluice_core.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_check_good_examples_exit_0() -> None:
    r = sluice("check", "crds/examples/public-api.yaml", "crds/examples/internal-service.yaml",
               "crds/examples/keys-required.yaml")
    assert r.returncode == 0, r.stderr
    assert "ok: crds/examples/public-api.yaml: shop/public-api (3 tiers, 2 rules, mode enforce)" in r.stdout


def test_check_bad_examples_exit_1_naming_file_field_and_reason() -> None:
    r = sluice("check", "crds/examples/bad")
    assert r.returncode == 1
    assert ("error: crds/examples/bad/negative-requests.yaml: spec.tiers[1].requests: "
            "must be a positive integer, got -5") in r.stderr
    assert len(r.stderr.strip().splitlines()) == len(list((ROOT / "crds/examples/bad").glob("*.yaml")))


def test_check_multi_document_and_unreadable(tmp_path: Path) -> None:
    f = tmp_path / "two.yaml"
    f.write_text((ROOT / "crds/examples/public-api.yaml").read_text() + "\n---\nnot: [a policy\n")
    r = sluice("check", str(f))
    assert r.returncode == 1 and "is not valid YAML" in r.stderr
    r = sluice("check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "cannot be read" in r.stderr


def test_check_prints_the_webhooks_warnings_and_exits_0(tmp_path: Path) -> None:
    """A valid but suspicious policy: `sluice check` warns as `kubectl apply` would (the same
    lint), naming the file and the field; warnings alone keep exit 0."""
    f = tmp_path / "shadow.yaml"
    f.write_text("apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\n"
                 "metadata: {name: trial, namespace: shop}\n"
                 "spec:\n  selector: {matchLabels: {app: shop}}\n  mode: shadow\n"
                 "  failureMode: closed\n  tiers: [{name: free, requests: 10, period: 1m}]\n")
    r = sluice("check", str(f))
    assert r.returncode == 0, r.stderr
    assert f"ok: {f}: shop/trial (1 tiers, 0 rules, mode shadow)" in r.stdout
    assert r.stderr.splitlines() == [
        f"warning: {f}: spec.mode: shadow never refuses a request; over-limit requests are only "
        "counted (shadow_limited). Set enforce to limit",
        f"warning: {f}: spec.failureMode: closed has no effect while spec.mode is shadow (a "
        "shadow policy lets requests through when Redis is down)"]


def test_the_installed_metadata_registers_the_commands_pyproject_declares() -> None:
    """The registry is the installed metadata: an install older than pyproject.toml fails here
    (make setup reinstalls) rather than as `invalid choice: 'sidecar'` in the sidecar tests."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMANDS_GROUP]
    installed = installed_commands()
    assert {name: ep.value for name, ep in installed.items()} == declared, "stale install: make setup"
    assert set(declared) == {"sidecar", "demo", "operator", "keys", "services", "analytics"}
    for name, entry_point in installed.items():
        command = load_command(entry_point)
        assert command.HELP and "\n" not in command.HELP, name
        assert callable(command.add_arguments) and callable(command.run), name


def test_help_lists_every_registered_command_with_its_help() -> None:
    r = sluice("--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps long help lines
    for name, entry_point in installed_commands().items():
        assert f" {name} {load_command(entry_point).HELP} " in text, name
    assert " check validate policy files offline" in text
