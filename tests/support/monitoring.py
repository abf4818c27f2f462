"""What the observability tests read: the PromQL of the shipped Grafana dashboard and of the
chart's PrometheusRule (rendered by Helm with its defaults, as installed), and the metric
names a scrape of Sluice's processes offers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from support.chart import CHART, render

DASHBOARD = CHART / "dashboards" / "sluice.json"
# Sluice's metric names; nothing else is queried (no up{}, no kube-state-metrics).
METRIC = re.compile(r"\bsluice_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "untyped": ("",)}


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, variables' queries included."""
    board = json.loads(path.read_text())
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["query"]["query"]) for v in board["templating"]["list"]
            if isinstance(v.get("query"), dict)]
    return out


def prometheus_rule(*set_args: str) -> dict[str, Any]:
    """The rendered PrometheusRule's spec (``groups``)."""
    docs = render("--set", "monitoring.prometheusRule.enabled=true", *set_args)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return dict(rule["spec"])


def rule_exprs(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in spec["groups"] for r in g["rules"]]


def sample_names(exposition: str) -> set[str]:
    """Every sample name the exposition's families can carry, by their declared type: a
    labelled family with no child yet still declares itself (its HELP and TYPE lines)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        names.update(fam.name + s for s in SUFFIXES[fam.type])
        names.update(s.name for s in fam.samples)
    return names
