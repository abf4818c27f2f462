"""The operator's own Prometheus metrics (served on ``--metrics-listen``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("sluice_operator_reconciles", "Namespace reconciles by result",
                                  ["result"], registry=r)
        self.reconcile_seconds = Histogram("sluice_operator_reconcile_seconds",
                                           "Time to reconcile one namespace", registry=r)
        self.redis_errors = Counter("sluice_operator_redis_errors", "Redis operations that failed",
                                    registry=r)
        self.redis_eviction_unsafe = Gauge(
            "sluice_operator_redis_eviction_unsafe",
            "1 when the Redis written to has a maxmemory under noeviction or allkeys-* (see the log)",
            registry=r)
        self.pushes = Counter("sluice_operator_config_pushes", "Config documents written to Redis",
                              registry=r)
        self.resyncs = Counter("sluice_operator_resyncs",
                               "Resync intervals run: Redis checked, heartbeats read", registry=r)
        self.restores = Counter("sluice_operator_restores",
                                "Times Redis had lost config and every namespace was reconciled again",
                                registry=r)
        self.status_writes = Counter("sluice_operator_status_writes",
                                     "Policy status writes (only when the status changes)", registry=r)
        # (namespace, policy) -> (accepted, programmed): the policies-by-condition gauge
        self.states: dict[tuple[str, str], tuple[bool, bool]] = {}
        # namespace -> sidecars there reporting an older config version than the operator wrote
        # (resync.py, every interval); only namespaces with some, so the series stay few
        self.sidecars_behind: dict[str, int] = {}
        r.register(_PolicyStates(self))
        r.register(_SidecarsBehind(self))


class _PolicyStates(Collector):
    def __init__(self, metrics: OperatorMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("sluice_operator_policies", "Policies by condition and status",
                              labels=["condition", "status"])
        states = list(self._m.states.values())
        for cond, idx in (("Accepted", 0), ("Programmed", 1)):
            true = sum(1 for s in states if s[idx])
            g.add_metric([cond, "True"], true)
            g.add_metric([cond, "False"], len(states) - true)
        yield g


class _SidecarsBehind(Collector):
    def __init__(self, metrics: OperatorMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("sluice_operator_sidecars_behind",
                              "Sidecars whose heartbeat reports an older config version than the operator "
                              "wrote (namespaces with none are not listed)", labels=["namespace"])
        for ns, n in sorted(self._m.sidecars_behind.items()):
            g.add_metric([ns], n)
        yield g
