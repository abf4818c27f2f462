"""The adversarial suite: each attack of ``support/attacks.py`` against a real sidecar process,
briefly, with what must hold afterwards. ``make bench`` runs the same attacks longer and writes
their figures (RSS, file descriptors, the bystander's latency) to docs/security.md.

What must hold for every attack: the sidecar stays under the injected sidecar's default memory
limit (128 MiB), lets go of every client connection once the attack ends, and keeps answering a
well-behaved client (the bystander) with 200s throughout."""

from __future__ import annotations

import pytest
from support.attacks import Report, Scenario, run_scenario, scenarios

pytestmark = pytest.mark.slow

MEMORY_LIMIT = 128 * 1024 * 1024  # the injected sidecar's default limit (--sidecar-resources)
SECONDS = 5.0  # longer than the quick header, idle and client timeouts the scenarios set (2 s)

SCENARIOS = {s.name: s for s in scenarios()}


def _check_costs(report: Report) -> None:
    log = report.outcome.get("sidecar_log_tail", "")
    assert report.rss_peak < MEMORY_LIMIT, f"{report.name}: RSS peaked at {report.rss_peak / 2**20:.0f} MiB"
    assert report.connections_after == 0, (
        f"{report.name}: {report.connections_after} client connections held after the attack\n{log}")
    assert report.bystander_ok > 0 and not report.bystander_failed, (
        f"{report.name}: the bystander got {report.bystander_ok} answers and these failures: "
        f"{report.bystander_failed[:20]}\n{log}")


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_attack_is_contained(name: str) -> None:
    scenario: Scenario = SCENARIOS[name]
    report = await run_scenario(scenario, SECONDS)
    out = report.outcome
    if name == "slowloris":
        assert out["closed_by_sidecar"] == out["connections"], out
    elif name == "header-flood":
        assert out["statuses"] == {"431": out["requests"]}, out["statuses"]
    elif name == "idle-flood":
        assert out["still_open_at_end"] == 0, out
    elif name == "slow-read":
        assert out["started"] > 0 and out["aborted"] >= out["started"], out
    elif name == "slow-body":
        assert out["statuses"] == {"408": out["connections"]}, out
        assert out["timed_out"] == out["connections"], out
    elif name == "upstream-reset":
        assert out["requests"] > 0, out
        assert out["extra_bytes_after_truncation"] == 0 and out["left_open"] == 0, out
    elif name == "regex-path":
        assert out["answered"] > 0, out
    elif name in ("xff-field-lines", "identity-header-churn"):
        assert out["admitted"] <= out["burst"], out
    elif name == "identity-churn-redis":
        assert out["clients"] > 0, out
        assert out["store_errors"] == 0 and out["failed_open"] == 0, out
    else:  # pragma: no cover - a new scenario needs its own check
        raise AssertionError(f"no check for scenario {name}")
    _check_costs(report)
