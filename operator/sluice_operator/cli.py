"""``sluice operator``: reconcile RateLimitPolicies and key Secrets into Redis (kopf)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from sluice_operator.settings import OperatorSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--redis", default=env("SLUICE_OPERATOR_REDIS"), required=env("SLUICE_OPERATOR_REDIS") is None,
                        help="Redis URL the sidecars read [env SLUICE_OPERATOR_REDIS]")
    parser.add_argument("--resync-interval-s", type=float,
                        default=float(env("SLUICE_OPERATOR_RESYNC_INTERVAL_S", "30")),
                        help="re-push lost config and refresh status this often "
                             "[env SLUICE_OPERATOR_RESYNC_INTERVAL_S] (default: 30)")
    parser.add_argument("--namespace", action="append", default=None,
                        help="watch only this namespace (repeatable; default: the whole cluster)")
    parser.add_argument("--peering", default=env("SLUICE_OPERATOR_PEERING"),
                        help="kopf peering name for running several replicas (leader election); "
                             "without it the operator runs standalone [env SLUICE_OPERATOR_PEERING]")
    parser.add_argument("--liveness", default=env("SLUICE_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        help="kopf liveness endpoint [env SLUICE_OPERATOR_LIVENESS]")
    parser.add_argument("--metrics-listen", default=env("SLUICE_OPERATOR_METRICS_LISTEN", "0.0.0.0:9091"),
                        help="HOST:PORT for the operator's /metrics [env SLUICE_OPERATOR_METRICS_LISTEN]")
    parser.add_argument("--log-level", default=env("SLUICE_OPERATOR_LOG_LEVEL", "info"))


def run(args: argparse.Namespace) -> int:
    import kopf
    from sluice_core import configstore

    from sluice_operator.handlers import build_registry
    from sluice_operator.reconcile import Reconciler

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = OperatorSettings(redis=args.redis, resync_interval_s=args.resync_interval_s,
                                namespaces=tuple(args.namespace or ()))
    from prometheus_client import start_http_server

    from sluice_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    host, _, port = args.metrics_listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=metrics.registry)
    registry = build_registry(settings, Reconciler(configstore.connect(settings.redis), metrics))
    asyncio.run(kopf.operator(
        registry=registry, clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
        standalone=args.peering is None, peering_name=args.peering, liveness_endpoint=args.liveness))
    return 0
