"""The Grafana dashboard the chart ships: generated, valid, and querying only metrics Sluice's
processes really export (a renamed metric must not leave an empty panel behind)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from sluice_operator.metrics import OperatorMetrics
from support.analytics_process import CollectorProcess
from support.chart import render
from support.monitoring import (
    DASHBOARD,
    METRIC,
    dashboard_exprs,
    prometheus_rule,
    rule_exprs,
    sample_names,
)
from support.paths import ROOT
from support.processes import SidecarProcess, UpstreamProcess, http_get


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("grafana_dashboard", ROOT / "hack" / "grafana_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["grafana_dashboard"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    gen = _generator()
    assert DASHBOARD.read_text() == gen.render(), (  # type: ignore[attr-defined]
        "charts/sluice/dashboards/sluice.json is out of date: run python hack/grafana_dashboard.py")


def test_the_dashboard_is_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in board["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{p['title']} runs off the grid"
        if p["type"] != "row":
            assert p["targets"], f"{p['title']} has no query"
            assert p["datasource"]["uid"] == "${datasource}", f"{p['title']} hard-codes a data source"
    for title, expr in dashboard_exprs():
        if not title.startswith("variable"):
            assert METRIC.search(expr), f"{title}: no Sluice metric in {expr!r}"


@pytest.fixture(scope="module")
def exported(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The sample names a scrape offers: of a real sidecar on Redis (after a few decisions, so
    that the labelled families have children), of a real collector, and of the operator's
    registry, which is exactly what its ``--metrics-listen`` serves (cli.py)."""
    tmp = tmp_path_factory.mktemp("metrics")
    policy = tmp / "policy.yaml"
    policy.write_text("apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: api}\n"
                      "spec:\n  tiers: [{name: free, requests: 2, period: 1h}]\n")
    url = redis_server.url  # type: ignore[attr-defined]
    up = UpstreamProcess()
    sidecar = SidecarProcess(up.url, "--redis", url, "--policy-file", str(policy))
    collector = CollectorProcess(url, f"sqlite:///{tmp / 'usage.db'}")
    try:
        for _ in range(3):
            http_get(sidecar.url + "/")
        text = http_get(sidecar.admin + "/metrics")[1].decode()
        text += http_get(f"http://127.0.0.1:{collector.port}/metrics")[1].decode()
        text += generate_latest(OperatorMetrics().registry).decode()
        yield sample_names(text)
    finally:
        collector.stop()
        sidecar.close()
        up.close()


def test_every_metric_the_dashboard_queries_is_exported(exported: set[str]) -> None:
    missing = {(title, name) for title, expr in dashboard_exprs() for name in METRIC.findall(expr)
               if name not in exported}
    assert not missing, f"queried but exported by no Sluice process: {sorted(missing)}"


def test_every_metric_an_alert_queries_is_exported(exported: set[str]) -> None:
    exprs = rule_exprs(prometheus_rule())
    assert exprs
    missing = {(alert, name) for alert, expr in exprs for name in METRIC.findall(expr) if name not in exported}
    assert not missing, f"alerted on but exported by no Sluice process: {sorted(missing)}"


def test_the_chart_ships_the_dashboard_as_grafana_sidecar_config_map() -> None:
    assert not [d for d in render() if d["kind"] == "ConfigMap" and "grafana" in d["metadata"]["name"]]
    docs = render("--set", "monitoring.grafanaDashboard.enabled=true",
                  "--set", "monitoring.grafanaDashboard.namespace=monitoring")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-grafana-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["sluice.json"]) == json.loads(DASHBOARD.read_text())


def test_pod_monitors_scrape_the_operator_and_every_injected_sidecar() -> None:
    from sluice_operator.injection.names import ADMIN_PORT_NAME

    docs = render("--set", "monitoring.podMonitors.enabled=true")
    monitors = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodMonitor"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"
                     and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    operator, sidecars = monitors["sluice-operator"], monitors["sluice-sidecars"]
    assert operator["podMetricsEndpoints"][0]["port"] in ports
    assert operator["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert sidecars["namespaceSelector"] == {"any": True}
    assert sidecars["podMetricsEndpoints"][0]["port"] == ADMIN_PORT_NAME
    (collector,) = [d for d in docs if d["kind"] == "Deployment"
                    and d["metadata"]["labels"].get("app.kubernetes.io/component") == "analytics"]
    analytics = monitors["sluice-analytics"]
    pod = collector["spec"]["template"]
    assert analytics["podMetricsEndpoints"][0]["port"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert analytics["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    no_collector = render("--set", "monitoring.podMonitors.enabled=true", "--set", "analytics.enabled=false")
    assert "sluice-analytics" not in {d["metadata"]["name"] for d in no_collector if d["kind"] == "PodMonitor"}


def test_no_monitoring_object_unless_asked() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"PodMonitor", "PrometheusRule"}


def test_the_alert_webhook_signing_secret_is_mounted_not_put_in_the_environment() -> None:
    docs = render("--set", "analytics.alertWebhookSecret.name=hooks", "--set", "analytics.alertWebhookSecret.key=hmac")
    (collector,) = [d for d in docs if d["kind"] == "Deployment"
                    and d["metadata"]["labels"].get("app.kubernetes.io/component") == "analytics"]
    pod = collector["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    path = env["SLUICE_ANALYTICS_ALERT_WEBHOOK_SECRET_FILE"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": "hooks", "items": [{"key": "hmac", "path": path.rsplit("/", 1)[1]}]}
    (default,) = [d for d in render() if d["kind"] == "Deployment"
                  and d["metadata"]["labels"].get("app.kubernetes.io/component") == "analytics"]
    names = {e["name"] for e in default["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "SLUICE_ANALYTICS_ALERT_WEBHOOK_SECRET_FILE" not in names
