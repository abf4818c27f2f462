"""The usage collector in the chart, rendered: `sluice analytics` as its own parser reads the
rendered args and env, SQLite on a PVC with one replica and Recreate, or PostgreSQL from a
Secret with replicas and rolling updates; its Service, ServiceAccount and least-privilege RBAC."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest
from support.chart import CHART, container, env_of, find, helm, render, secret_ref

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)

NS = "sluice-system"


def collector_settings(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Any:
    """What `sluice analytics` makes of the rendered container: its own parser, the container's
    plain env values (a Secret's stands in as a placeholder URL)."""
    from sluice_analytics import cli as analytics_cli

    c = container(find(docs, "Deployment", "sluice-analytics"))
    for name in list(os.environ):
        if name.startswith("SLUICE_ANALYTICS_"):
            monkeypatch.delenv(name)
    stand_in = {"SLUICE_ANALYTICS_REDIS": "redis://:pw@redis:6379",
                "SLUICE_ANALYTICS_DATABASE": "postgresql://u:pw@db:5432/usage",
                "SLUICE_ANALYTICS_CONSUMER": "sluice-analytics-0"}
    for name, value in env_of(c).items():
        monkeypatch.setenv(name, value if isinstance(value, str) else stand_in[name])
    assert c["args"][0] == "analytics"
    parser = argparse.ArgumentParser()
    analytics_cli.add_arguments(parser)
    return analytics_cli.settings_from_args(parser.parse_args(c["args"][1:]))


def test_collector_on_sqlite_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(namespace=NS)
    dep = find(docs, "Deployment", "sluice-analytics")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # one writer on one RWO volume
    settings = collector_settings(docs, monkeypatch)
    assert settings.api_auth == "kubernetes" and settings.listen == "0.0.0.0:9092"
    assert (settings.keep_minutes_h, settings.keep_hours_d, settings.keep_days_d) == (48, 90, 400)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    db_path = settings.database.removeprefix("sqlite:///")
    mount = next(m for m in c["volumeMounts"] if db_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = find(docs, "PersistentVolumeClaim", "sluice-analytics")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert env_of(c)["SLUICE_ANALYTICS_REDIS"] == secret_ref("sluice-redis", "url")
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["serviceAccountName"] == "sluice-analytics"
    svc = find(docs, "Service", "sluice-analytics")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9092, "targetPort": "http",
                                     "protocol": "TCP"}]
    assert {"name": "http", "containerPort": 9092, "protocol": "TCP"} in c["ports"]
    # without a PVC (no provisioner): an emptyDir at the same place
    docs = render("--set", "analytics.persistence.enabled=false", namespace=NS)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = find(docs, "Deployment", "sluice-analytics")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["emptyDir"]


def test_collector_on_postgresql_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("--set", "analytics.database.existingSecret=usage-db",
                  "--set", "analytics.replicaCount=3", "--set", "analytics.retention.daysDays=30",
                  "--set-string", "analytics.env.SLUICE_ANALYTICS_BATCH=500", namespace=NS)
    dep = find(docs, "Deployment", "sluice-analytics")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    c = container(dep)
    assert env_of(c)["SLUICE_ANALYTICS_DATABASE"] == secret_ref("usage-db", "url")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    settings = collector_settings(docs, monkeypatch)
    assert settings.database.startswith("postgresql://")
    assert settings.keep_days_d == 30 and settings.batch == 500
    # SQLite is one writer: more replicas are refused, as are the variables the chart sets
    res = helm("template", "sluice", str(CHART), "--set", "analytics.replicaCount=2", check=False)
    assert res.returncode != 0 and "needs PostgreSQL" in res.stderr, res.stderr
    res = helm("template", "sluice", str(CHART), "--set",
               "analytics.env.SLUICE_ANALYTICS_REDIS=redis://x:6379", check=False)
    assert res.returncode != 0 and "SLUICE_ANALYTICS_REDIS" in res.stderr, res.stderr


def test_collector_rbac_is_what_its_api_needs() -> None:
    docs = render(namespace=NS)
    role = find(docs, "ClusterRole", "sluice-analytics")
    assert [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]] == [
        (["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        (["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
        ([""], ["events"], ["create"]),
        (["sluice.dev"], ["ratelimitpolicies", "clusterratelimitpolicies"], ["get", "list"])]
    binding = find(docs, "ClusterRoleBinding", "sluice-analytics")
    assert binding["roleRef"]["name"] == "sluice-analytics"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sluice-analytics",
                                    "namespace": NS}]
    assert find(docs, "ServiceAccount", "sluice-analytics")["automountServiceAccountToken"] is True
    # off: none of it
    docs = render("--set", "analytics.enabled=false", namespace=NS)
    assert not [d for d in docs if "analytics" in d["metadata"]["name"]]


def test_uninstall_keeps_the_usage_history_unless_told() -> None:
    """REVIEW15 M7: the SQLite PVC holds the history and the record of alerts already sent; an
    uninstall and reinstall must not lose it silently (the k8s release test reinstalls onto it)."""
    claim = find(render(namespace=NS), "PersistentVolumeClaim", "sluice-analytics")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    claim = find(render("--set", "analytics.persistence.keep=false", namespace=NS),
                 "PersistentVolumeClaim", "sluice-analytics")
    assert "helm.sh/resource-policy" not in (claim["metadata"].get("annotations") or {})
