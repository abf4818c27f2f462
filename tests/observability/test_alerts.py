"""The chart's PrometheusRule under ``promtool test rules`` (promtool built from the Prometheus
Go module by hack/k8s/build.sh, like the Kubernetes tools): each alert fires when it should and
stays quiet when it should not (alerts.test.yaml), and the values that tune them reach them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.control_plane import require_binaries
from support.monitoring import prometheus_rule, rule_exprs

HERE = Path(__file__).parent


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = require_binaries(names=("promtool",)) / "promtool"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL)


def test_each_alert_fires_when_it_should_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    (tmp_path / "sluice-rules.yaml").write_text(yaml.safe_dump(prometheus_rule(), sort_keys=False))
    shutil.copy(HERE / "alerts.test.yaml", tmp_path)
    checked = promtool("check", "rules", "sluice-rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    res = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_test() -> None:
    tests = yaml.safe_load((HERE / "alerts.test.yaml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
              if any(t.get("exp_alerts") or [])}
    alerts = {name for name, _ in rule_exprs(prometheus_rule())}
    assert alerts == tested, f"alerts never seen firing in alerts.test.yaml: {sorted(alerts - tested)}"


@pytest.mark.parametrize(("value", "expect"), [
    ("monitoring.prometheusRule.limitedShare=0.6", "> 0.6"),  # --set-json: --set keeps 0.6 a string
    ('monitoring.prometheusRule.limitedShareWindow="30m"', "[30m]"),
    ("monitoring.prometheusRule.collectorLagSeconds=900", "> 900"),
])
def test_the_chart_values_tune_the_alerts(value: str, expect: str) -> None:
    exprs = "\n".join(expr for _, expr in rule_exprs(prometheus_rule("--set-json", value)))
    assert expect in exprs
