"""Policy and keys files as Sluice reads them: a key given twice is refused (YAML would keep the
last value), errors never quote the file (it may hold plaintext API keys), and a standalone
policy file holding several policies says which one it enforces."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from sluice_core.apikeys import load_grants_file
from sluice_core.errors import PolicyErrors
from sluice_core.parse import parse_policy
from sluice_core.policyfile import load_policies
from support.paths import ROOT
from support.sidecar_harness import Upstream, policy_doc, start_sidecar

POLICY = parse_policy(policy_doc(tiers=[{"name": "free", "requests": 5, "period": "1m"},
                                        {"name": "pro", "requests": 50, "period": "1m"}]))
SECRET = "sk_live_PayingCustomer42"


def keys_errors(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "keys.yaml"
    f.write_text(text)
    with pytest.raises(PolicyErrors) as info:
        load_grants_file(f, POLICY)
    return [f"{e.path}: {e.reason}" for e in info.value.errors]


def test_a_key_listed_twice_is_refused_by_position_never_by_name(tmp_path: Path) -> None:
    errors = keys_errors(tmp_path, f"keys:\n  {SECRET}: pro\n  other: free\n  {SECRET}: free\n")
    assert errors == ["(keys file): is not valid YAML: a mapping key is given twice, at line 4, "
                      "column 3 and line 2, column 3 (YAML would keep only the last value)"]
    assert not any(SECRET in e or "PayingCustomer" in e for e in errors)


@pytest.mark.parametrize("text", [
    f'keys:\n  "{SECRET}": {{tier: pro, tier: free}}\n',  # inside one entry
    f"keys:\n  {SECRET}: pro\nkeys:\n  {SECRET}: free\n",  # the top-level mapping
    f'keys:\n  {SECRET}: pro\n  "{SECRET}": free\n',  # spelled differently, the same key
])
def test_duplicates_are_refused_at_every_level(tmp_path: Path, text: str) -> None:
    [error] = keys_errors(tmp_path, text)
    assert "a mapping key is given twice" in error and SECRET not in error


def test_a_yaml_syntax_error_in_a_keys_file_does_not_quote_the_file(tmp_path: Path) -> None:
    [error] = keys_errors(tmp_path, f"keys:\n  {SECRET}: pro\n  \"{SECRET}-2: [free\n")
    assert error.startswith("(keys file): is not valid YAML: ") and "line" in error
    assert "PayingCustomer" not in error


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    """``<<: *base`` followed by one of base's keys is YAML's override, not a duplicate."""
    f = tmp_path / "keys.yaml"
    f.write_text(f"base: &base {{tier: free, limit: {{requests: 10, period: 1m}}}}\n"
                 f"keys:\n  {SECRET}: {{<<: *base, tier: pro}}\n")
    [grant] = load_grants_file(f, POLICY).values()
    assert grant.tier == "pro" and grant.limit is not None and grant.limit.requests == 10


def test_a_field_given_twice_in_a_policy_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\n"
                 "spec:\n  tiers:\n    - name: free\n      requests: 100\n      period: 1m\n"
                 "      requests: 1\n")
    with pytest.raises(PolicyErrors) as info:
        load_policies(f)
    assert [str(e) for e in info.value.errors] == [
        f"{f}: (file): is not valid YAML: a mapping key is given twice, at line 9, column 7 and "
        "line 7, column 7 (YAML would keep only the last value)"]
    r = subprocess.run([sys.executable, "-m", "sluice_core.cli", "check", str(f)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "a mapping key is given twice, at line 9" in r.stderr


# Several policies in one standalone file -----------------------------------------------------
async def test_two_policies_in_a_standalone_file_warn_and_the_first_by_name_wins(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """As the README promises for every pod several policies select: the first by name, with a
    warning naming them all (the file's order does not decide)."""
    text = "\n---\n".join(
        f"apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  tiers: [{{name: free, requests: {n}, period: 1m}}]\n"
        for name, n in (("zeta", 1), ("alpha", 7)))
    caplog.set_level(logging.WARNING, logger="sluice.config")
    sc = await start_sidecar(tmp_path, text, upstream=upstream)
    try:
        async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/admin/config") as r:
            assert (await r.json())["config"]["policyRef"] == "default/alpha"
    finally:
        await sc.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "several policies select this pod (alpha, zeta); enforcing alpha" in warnings
