"""Write the Grafana dashboard the chart ships (charts/sluice/dashboards/sluice.json).

The JSON is generated so that every panel has the same shape (one datasource variable, the
namespace and policy filters on every sidecar query, ids and grid positions that do not drift
when a panel is added) and is committed, so people can import the file without running
anything; tests/observability checks that the file is what this script writes and that every
metric it queries is one Sluice exports.

    python hack/grafana_dashboard.py            # rewrite the file
    python hack/grafana_dashboard.py --check    # exit 1 when the file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "charts" / "sluice" / "dashboards" / "sluice.json"
UID = "sluice-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
# The filters every sidecar query carries: the pod's namespace (from the scrape) and the policy.
SEL = 'namespace=~"$namespace", policy=~"$policy"'
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def rows() -> list[Row]:
    decided = f'sum(rate(sluice_decisions_total{{{SEL}}}[{RATE}]))'
    return [
        Row("Decisions", [
            Panel("Requests decided", "Decisions per second in the range, all outcomes.",
                  [(decided, "decisions/s")], kind="stat", unit="reqps", width=6, height=4),
            Panel("Share limited", "Share of decisions answered 429 (limited) over all decisions.",
                  [(f'sum(rate(sluice_decisions_total{{{SEL}, decision="limited"}}[{RATE}])) / {decided}',
                    "limited")], kind="stat", unit="percentunit", width=6, height=4),
            Panel("Failed open or closed", "Decisions taken without Redis (the policy's failureMode) per second.",
                  [(f'sum(rate(sluice_decisions_total{{{SEL}, decision=~"failed_open|failed_closed"}}[{RATE}]))',
                    "failed")], kind="stat", unit="reqps", width=6, height=4),
            Panel("Sidecars with an open breaker", "Sidecars whose decision-store circuit breaker is open now.",
                  [(f'sum(sluice_circuit_state{{{NS}}})', "open")], kind="stat", width=6, height=4),
            Panel("Decisions by outcome",
                  "allowed, limited, shadow_limited (a shadow-mode policy would have refused), "
                  "failed_open / failed_closed (Redis unavailable), unauthorized, skipped, unconfigured.",
                  [(f'sum by (decision) (rate(sluice_decisions_total{{{SEL}}}[{RATE}]))', "{{decision}}")],
                  unit="reqps", stack=True),
            Panel("Share limited by policy", "Limited over all decisions, per policy.",
                  [(f'sum by (namespace, policy) (rate(sluice_decisions_total{{{SEL}, decision="limited"}}[{RATE}]))'
                    f' / sum by (namespace, policy) (rate(sluice_decisions_total{{{SEL}}}[{RATE}]))',
                    "{{namespace}}/{{policy}}")], unit="percentunit"),
            Panel("Decisions by policy, tier and rule", "Per second over the range, busiest first.",
                  [(f'sort_desc(sum by (namespace, policy, tier, rule, decision) '
                    f'(rate(sluice_decisions_total{{{SEL}}}[$__range])))', "")],
                  kind="table", unit="reqps", width=24,
                  extra={"targets_format": "table", "instant": True}),
            Panel("Decision latency", "Time to decide one request (identify, match, Redis): p50, p95, p99.",
                  [(f'histogram_quantile({q}, sum by (le) (rate(sluice_decision_seconds_bucket{{{NS}}}[{RATE}])))',
                    f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s"),
            Panel("Decisions per Redis script run",
                  "Mean decisions coalesced into one Lua call (1 when idle, more under load).",
                  [(f'sum(rate(sluice_redis_decisions_total{{{NS}}}[{RATE}])) / '
                    f'sum(rate(sluice_redis_batches_total{{{NS}}}[{RATE}]))', "decisions/batch")]),
        ]),
        Row("Decision store (Redis)", [
            Panel("Store errors by reason", "timeout, unavailable, auth, oom, refused, circuit_open.",
                  [(f'sum by (reason) (rate(sluice_store_errors_total{{{NS}}}[{RATE}]))', "{{reason}}")],
                  unit="ops", stack=True),
            Panel("Breaker state by pod", "1: the sidecar's breaker is open and it probes Redis in the background.",
                  [(f'max by (namespace, pod) (sluice_circuit_state{{{NS}}})', "{{namespace}}/{{pod}}")],
                  extra={"max": 1}),
            Panel("Breaker probes", "Background probes while a breaker is open, by result.",
                  [(f'sum by (result) (rate(sluice_store_probes_total{{{NS}}}[{RATE}]))', "{{result}}")],
                  unit="ops"),
            Panel("API keys resolved from Redis grants", "Grant-cache misses by result (known, unknown).",
                  [(f'sum by (result) (rate(sluice_grant_resolves_total{{{SEL}}}[{RATE}]))', "{{result}}")],
                  unit="ops"),
        ]),
        Row("Config rollout", [
            # The sidecars' scrape keeps the pod's namespace as `namespace` (honorLabels false:
            # tenants run those pods), so the document's own label is exported_namespace.
            Panel("Config version skew",
                  "Per config document (a namespace's, or _cluster), over the sidecars of the selected "
                  "namespaces: the newest version a sidecar enforces minus the oldest. "
                  "Above 0 for long: some sidecars did not load the current config.",
                  [(f'max by (exported_namespace) (sluice_config_version{{{NS}}}) - '
                    f'min by (exported_namespace) (sluice_config_version{{{NS}}})', "{{exported_namespace}}")]),
            Panel("Sidecars behind the operator",
                  "Sidecars whose heartbeat reports an older config version than the operator wrote "
                  "(only namespaces with some are listed).",
                  [("sum by (namespace) (sluice_operator_sidecars_behind)", "{{namespace}}")]),
            Panel("Sidecars without a config", "Sidecars that have not loaded a valid config.",
                  [(f'count by (namespace) (sluice_config_loaded{{{NS}}} == 0)', "{{namespace}}")]),
            Panel("Config reloads by result", "ok, invalid (the last good config keeps serving), unreachable.",
                  [(f'sum by (result) (rate(sluice_config_reloads_total{{{NS}}}[{RATE}]))', "{{result}}")],
                  unit="ops"),
            Panel("Policies by condition", "The operator's policies by condition (Accepted, Programmed) and status.",
                  [("sum by (condition, status) (sluice_operator_policies)", "{{condition}}={{status}}")]),
            Panel("Operator reconciles", "Namespace reconciles per second by result, and p95 reconcile time.",
                  [(f'sum by (result) (rate(sluice_operator_reconciles_total[{RATE}]))', "{{result}}"),
                   (f'histogram_quantile(0.95, sum by (le) (rate(sluice_operator_reconcile_seconds_bucket[{RATE}])))',
                    "p95 seconds")]),
            Panel("Operator and Redis", "Redis errors, restores of lost config, and a maxmemory policy that "
                                        "could evict config (1: see the operator's log).",
                  [(f'sum(rate(sluice_operator_redis_errors_total[{RATE}]))', "redis errors/s"),
                   (f'sum(increase(sluice_operator_restores_total[{RATE}]))', "restores"),
                   ("max(sluice_operator_redis_eviction_unsafe)", "eviction unsafe")]),
            Panel("Heartbeat write errors", "Heartbeats Redis did not take, by reason.",
                  [(f'sum by (reason) (rate(sluice_heartbeat_errors_total{{{NS}}}[{RATE}]))', "{{reason}}")],
                  unit="ops"),
        ]),
        Row("Protection and upstream", [
            Panel("Overload refusals", "Connections and requests refused to bound the sidecar's memory, by reason.",
                  [(f'sum by (reason) (rate(sluice_overload_refusals_total{{{NS}}}[{RATE}]))', "{{reason}}")],
                  unit="ops", stack=True),
            Panel("Client connections and requests in flight", "Summed over the sidecars.",
                  [(f'sum(sluice_client_connections{{{NS}}})', "connections"),
                   (f'sum(sluice_inflight_requests{{{NS}}})', "in flight")]),
            Panel("Upstream errors", "Requests the application failed, by kind.",
                  [(f'sum by (kind) (rate(sluice_upstream_errors_total{{{NS}}}[{RATE}]))', "{{kind}}")],
                  unit="ops"),
            Panel("Unparseable requests", "Requests refused 400 before any decision.",
                  [(f'sum(rate(sluice_bad_requests_total{{{NS}}}[{RATE}]))', "400/s")], unit="ops"),
        ]),
        Row("Usage pipeline", [
            Panel("Collector lag", "Usage windows not yet applied, and the age of the oldest.",
                  [("max(sluice_analytics_stream_lag_entries)", "entries"),
                   ("max(sluice_analytics_stream_lag_seconds)", "seconds")]),
            Panel("Windows written and applied", "Sidecars' windows written, dropped and failed; the collector's applied.",
                  [(f'sum(rate(sluice_usage_windows_total{{{NS}}}[{RATE}]))', "written"),
                   (f'sum(rate(sluice_usage_dropped_windows_total{{{NS}}}[{RATE}]))', "dropped"),
                   (f'sum(rate(sluice_usage_errors_total{{{NS}}}[{RATE}]))', "write errors"),
                   (f'sum(rate(sluice_analytics_windows_applied_total[{RATE}]))', "applied")],
                  unit="ops"),
            Panel("Collector errors", "Database and Redis failures (retried), entries set aside as bad, "
                                      "windows refused as stale.",
                  [(f'sum(rate(sluice_analytics_db_errors_total[{RATE}]))', "db"),
                   (f'sum(rate(sluice_analytics_redis_errors_total[{RATE}]))', "redis"),
                   (f'sum(rate(sluice_analytics_bad_entries_total[{RATE}]))', "bad entries"),
                   (f'sum(rate(sluice_analytics_windows_stale_total[{RATE}]))', "stale")],
                  unit="ops"),
            Panel("Collector batch time", "p95 time to apply one batch (one SQL transaction).",
                  [(f'histogram_quantile(0.95, sum by (le) (rate(sluice_analytics_batch_seconds_bucket[{RATE}])))',
                    "p95")], unit="s"),
        ]),
    ]


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    instant = bool(p.extra.get("instant"))
    targets = [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                **({"instant": True, "range": False, "format": "table"} if instant else {})}
               for i, (expr, legend) in enumerate(p.targets)]
    defaults: dict[str, Any] = {"unit": p.unit}
    if "max" in p.extra:
        defaults["max"] = p.extra["max"]
    if p.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
                              "fillOpacity": 20 if p.stack else 5}
    panel: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }
    if p.kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area"}
    if p.kind == "table":
        panel["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return panel


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows():
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x, line = pid + 1, y + 1, 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y = 0, y + line
                line = 0
            panels.append(_panel(p, pid, x, y))
            pid, x, line = pid + 1, x + p.width, max(line, p.height)
        y += line
    return {
        "uid": UID, "title": "Sluice", "description": "Sluice rate limiting: decisions, Redis, config rollout, "
                                                    "protection, the usage pipeline.",
        "tags": ["sluice", "rate-limiting"], "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("namespace", "Namespace", "label_values(sluice_decisions_total, namespace)"),
            _variable("policy", "Policy", 'label_values(sluice_decisions_total{namespace=~"$namespace"}, policy)'),
        ]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file is not what this writes")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python hack/grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
