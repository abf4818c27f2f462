"""Prometheus metrics of one sidecar. Labels are bounded by the config (policy, tier, rule) or by
code (decision, reason); a client id is never a label. Per-client views belong to the admin API."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # decision: allowed, limited, shadow_limited, failed_open, failed_closed, unauthorized,
        # skipped, unconfigured
        self.decisions = Counter("sluice_decisions", "Rate-limit decisions by outcome",
                                 ["policy", "tier", "rule", "decision"], registry=r)
        self.decision_seconds = Histogram(
            "sluice_decision_seconds", "Time to decide one request (identify, match, store)",
            ["store"], registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        # reason: timeout, unavailable, auth, oom, refused (stores/base.py), circuit_open
        self.store_errors = Counter("sluice_store_errors", "Decision-store failures",
                                    ["store", "reason"], registry=r)
        # result: known, unknown (a cache miss of a policy whose keys live in Redis grants)
        self.grant_resolves = Counter("sluice_grant_resolves",
                                      "API keys resolved from their Redis grants (grant-cache misses)",
                                      ["policy", "result"], registry=r)
        self.circuit_state = Gauge("sluice_circuit_state",
                                   "Decision-store circuit breaker: 0 closed, 1 open (probing Redis "
                                   "in the background)", registry=r)
        self.store_probes = Counter("sluice_store_probes",
                                    "Background probes of the decision store while the breaker is open",
                                    ["result"], registry=r)
        self.config_version = Gauge("sluice_config_version", "Version of the config being enforced",
                                    ["namespace"], registry=r)
        self.config_loaded = Gauge("sluice_config_loaded", "1 once a valid config is loaded", registry=r)
        self.config_reloads = Counter("sluice_config_reloads", "Config load attempts by result",
                                      ["result"], registry=r)
        # reason: the transport's (timeout, unavailable, auth, oom, refused)
        self.heartbeat_errors = Counter("sluice_heartbeat_errors",
                                        "Heartbeats Redis did not take (the operator does not "
                                        "count this pod meanwhile)", ["reason"], registry=r)
        self.upstream_errors = Counter("sluice_upstream_errors", "Requests the upstream failed",
                                       ["kind"], registry=r)
        self.bad_requests = Counter("sluice_bad_requests", "Requests refused as unparseable (400)",
                                    registry=r)
        self.inflight = Gauge("sluice_inflight_requests",
                              "Requests being decided or proxied (what --max-inflight-requests caps)",
                              registry=r)
        # reason: connections (over --max-connections, 503), client_connections (over
        # --max-connections-per-client, 503), inflight (over --max-inflight-requests, 503),
        # header_size (431), header_timeout (closed), send_timeout (a client that stopped reading
        # its response: aborted), body_timeout (a request body that stopped arriving: 408) -- both
        # after --client-timeout-s
        self.overload_refusals = Counter(
            "sluice_overload_refusals", "Connections and requests refused to bound the sidecar's memory",
            ["reason"], registry=r)
        self.client_connections = Gauge("sluice_client_connections", "Open client connections",
                                        registry=r)
        # Usage analytics (usage_flush.py): windows written to the usage stream, windows dropped
        # after their retries (or cut short at shutdown), XADD failures by the transport's reason.
        self.usage_windows = Counter("sluice_usage_windows", "Usage windows written to the usage stream",
                                     registry=r)
        self.usage_dropped_windows = Counter(
            "sluice_usage_dropped_windows", "Usage windows dropped: Redis did not take them within their retries",
            registry=r)
        self.usage_errors = Counter("sluice_usage_errors", "Usage window writes Redis did not take",
                                    ["reason"], registry=r)
        self._children: dict[tuple[str, str, str, str], object] = {}
        self._resolve_children: dict[tuple[str, str], object] = {}

    def grant_resolved(self, policy: str, result: str) -> None:
        key = (policy, result)
        child = self._resolve_children.get(key)
        if child is None:
            child = self._resolve_children[key] = self.grant_resolves.labels(policy, result)
        child.inc()  # type: ignore[attr-defined]

    def decision(self, policy: str, tier: str, rule: str, decision: str) -> None:
        key = (policy, tier, rule, decision)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(policy, tier, rule, decision)
        child.inc()  # type: ignore[attr-defined]


class BatchCollector(Collector):
    """``sluice_redis_decisions_total`` / ``sluice_redis_batches_total``: their ratio is the mean
    number of decisions per script run (how much coalescing happens under load)."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        decisions, batches = self._read()
        yield CounterMetricFamily("sluice_redis_decisions", "Decisions sent to Redis", value=decisions)
        yield CounterMetricFamily("sluice_redis_batches", "Decision script runs sent to Redis (batches)",
                                  value=batches)
