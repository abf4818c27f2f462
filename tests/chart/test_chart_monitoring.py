"""The chart's scrape and alert objects against a tenant (REVIEW15 M6): the injected sidecars
run in pods their namespace's owners write, who can name a port `sluice-admin` and serve made-up
series. The sidecars' PodMonitor must keep the discovered `namespace`/`pod`/`job` labels, and
the alerts on the operator's and the collector's metrics must not read that scrape
(promtool proves the latter: tests/observability/alerts.test.yaml)."""

from __future__ import annotations

import re

import pytest
from support.chart import render
from support.monitoring import prometheus_rule, rule_exprs

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)


def monitors() -> dict[str, dict[str, object]]:
    docs = render("--set", "monitoring.podMonitors.enabled=true", namespace="mon")
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodMonitor"}


def test_the_sidecars_scrape_does_not_trust_the_target_with_its_labels() -> None:
    (endpoint,) = monitors()["sluice-sidecars"]["podMetricsEndpoints"]  # type: ignore[index]
    assert endpoint["honorLabels"] is False
    # only pods the injector marked (its annotation), not any port that happens to carry the name
    assert {"sourceLabels": ["__meta_kubernetes_pod_annotation_sluice_dev_injected"],
            "regex": "true", "action": "keep"} in endpoint["relabelings"]


def test_the_release_own_pods_keep_their_series_namespace() -> None:
    found = monitors()
    for name in ("sluice-operator", "sluice-analytics"):
        (endpoint,) = found[name]["podMetricsEndpoints"]  # type: ignore[index]
        assert endpoint["honorLabels"] is True, name


def test_operator_and_collector_alerts_ignore_the_sidecars_scrape() -> None:
    exprs = dict(rule_exprs(prometheus_rule()))  # rendered into sluice-system
    own = re.compile(r"sluice_(operator|analytics)_[a-z_]+(\{[^}]*\})?")
    for alert, expr in exprs.items():
        for m in own.finditer(expr):
            assert m[2] and 'job!="sluice-system/sluice-sidecars"' in m[2], f"{alert}: {m[0]}"
