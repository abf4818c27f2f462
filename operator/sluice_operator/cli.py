"""``sluice operator``: reconcile RateLimitPolicies and key Secrets into Redis (kopf)."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import os

from sluice_core.redisurl import parse_redis_url

from sluice_operator import injection_flags
from sluice_operator.settings import CLUSTER_KEYS_NAMESPACE, OperatorSettings

HELP = "reconcile RateLimitPolicies and key Secrets into Redis (kopf)"  # one line in `sluice --help`


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
    parser.add_argument("--cluster-keys-namespace",
                        default=env("SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE", CLUSTER_KEYS_NAMESPACE),
                        help="namespace holding the key Secrets of ClusterRateLimitPolicies "
                             "[env SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE] (default: sluice-system)")
    parser.add_argument("--cluster-policies", choices=("auto", "on", "off"),
                        default=env("SLUICE_OPERATOR_CLUSTER_POLICIES", "auto"),
                        help="serve ClusterRateLimitPolicies; auto: only when watching the whole "
                             "cluster [env SLUICE_OPERATOR_CLUSTER_POLICIES] (default: auto)")
    parser.add_argument("--peering", default=env("SLUICE_OPERATOR_PEERING"),
                        help="kopf peering name for running several replicas (leader election); "
                             "without it the operator runs standalone [env SLUICE_OPERATOR_PEERING]")
    parser.add_argument("--peering-lifetime-s", type=int,
                        default=int(env("SLUICE_OPERATOR_PEERING_LIFETIME_S", "60")),
                        help="with --peering: how long a replica's keep-alive counts; a replica that "
                             "dies without saying so is taken over after at most this long "
                             "[env SLUICE_OPERATOR_PEERING_LIFETIME_S] (default: 60)")
    parser.add_argument("--liveness", default=env("SLUICE_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        help="kopf liveness endpoint [env SLUICE_OPERATOR_LIVENESS]")
    parser.add_argument("--metrics-listen", default=env("SLUICE_OPERATOR_METRICS_LISTEN", "0.0.0.0:9091"),
                        help="HOST:PORT for the operator's /metrics [env SLUICE_OPERATOR_METRICS_LISTEN]")
    w = parser.add_argument_group("admission webhooks (policy validation, sidecar injection)")
    w.add_argument("--webhook-listen", default=env("SLUICE_OPERATOR_WEBHOOK_LISTEN"),
                   help="HOST:PORT to serve the webhooks on (HTTPS); unset: no webhooks "
                        "[env SLUICE_OPERATOR_WEBHOOK_LISTEN]")
    w.add_argument("--webhook-service", default=env("SLUICE_OPERATOR_WEBHOOK_SERVICE"),
                   help="NAMESPACE/NAME[:PORT] of the Service in front of the webhooks: the operator "
                        "then keeps the webhook configurations (with the CA bundle) up to date "
                        "[env SLUICE_OPERATOR_WEBHOOK_SERVICE]")
    w.add_argument("--webhook-url", default=env("SLUICE_OPERATOR_WEBHOOK_URL"),
                   help="instead of a Service: the https:// URL the API server calls (local runs)")
    w.add_argument("--webhook-cert-dir", default=env("SLUICE_OPERATOR_WEBHOOK_CERT_DIR", "/tmp/sluice-webhook-certs"),
                   help="where the self-signed certificate is kept when none is provided")
    w.add_argument("--webhook-provided-cert-dir",
                   default=env("SLUICE_OPERATOR_WEBHOOK_PROVIDED_CERT_DIR", "/etc/sluice/webhook-certs"),
                   help="cert-manager's mounted Secret (tls.crt, tls.key, ca.crt), used when present")
    w.add_argument("--webhook-cert-secret", default=env("SLUICE_OPERATOR_WEBHOOK_CERT_SECRET"),
                   help="NAMESPACE/NAME of a Secret through which all replicas share the "
                        "self-signed certificate (the first creates it); unset: each replica "
                        "keeps its own in --webhook-cert-dir [env SLUICE_OPERATOR_WEBHOOK_CERT_SECRET]")
    injection_flags.add_arguments(parser.add_argument_group(
        "injected sidecar (the mutating webhook's container; an empty value means the default)"))
    parser.add_argument("--log-level", default=env("SLUICE_OPERATOR_LOG_LEVEL", "info"))


def run(args: argparse.Namespace) -> int:
    import kopf
    from sluice_core import configstore

    from sluice_operator.handlers import build_registry
    from sluice_operator.reconcile import Reconciler

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sluice_operator.webhook_config import Endpoint

    injection = injection_flags.injection_settings(args)  # SystemExit naming a bad --sidecar-* flag
    try:  # before anything connects; the message never echoes the URL (it may hold a password)
        parse_redis_url(args.redis)
    except ValueError as exc:
        raise SystemExit(f"sluice operator: --redis: {exc}") from None

    if args.webhook_cert_secret:
        from sluice_operator.certstore import parse_secret_ref

        try:
            parse_secret_ref(args.webhook_cert_secret)
        except ValueError as exc:
            raise SystemExit(f"sluice operator: --webhook-cert-secret: {exc}") from None
    if args.peering_lifetime_s < 1:
        raise SystemExit("sluice operator: --peering-lifetime-s must be at least 1")
    check_cluster_keys_namespace(args)
    endpoint = None
    dns: tuple[str, ...] = ()
    if args.webhook_service:
        ns, _, rest = args.webhook_service.partition("/")
        name, _, port = rest.partition(":")
        endpoint = Endpoint(service_namespace=ns, service_name=name, service_port=int(port or 443))
        dns = (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local")
    elif args.webhook_url:
        endpoint = Endpoint(url=args.webhook_url)
    settings = OperatorSettings(
        redis=args.redis, resync_interval_s=args.resync_interval_s,
        namespaces=tuple(args.namespace or ()), cluster_keys_namespace=args.cluster_keys_namespace,
        cluster_policies={"auto": None, "on": True, "off": False}[args.cluster_policies],
        webhook_listen=args.webhook_listen,
        webhook_cert_dir=args.webhook_cert_dir, webhook_provided_cert_dir=args.webhook_provided_cert_dir,
        webhook_cert_secret=args.webhook_cert_secret,
        webhook_dns_names=dns or ("localhost",), webhook_ips=("127.0.0.1",), webhook_endpoint=endpoint,
        injection=injection)
    from prometheus_client import start_http_server

    from sluice_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    host, _, port = args.metrics_listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=metrics.registry)
    registry = build_registry(settings, Reconciler(configstore.connect(settings.redis), metrics))
    # A registry of our own has no login handler: use the kubernetes client's credentials
    # (in-cluster ServiceAccount, else the kubeconfig).
    kopf.on.login(registry=registry)(kopf.login_via_client)
    if args.peering:
        from sluice_operator.peering import configure_peering, peering_priority

        configure_peering(registry, args.peering, args.peering_lifetime_s)
    asyncio.run(kopf.operator(
        registry=registry, clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
        standalone=args.peering is None, peering_name=args.peering,
        priority=peering_priority() if args.peering else None, liveness_endpoint=args.liveness))
    return 0


def check_cluster_keys_namespace(args: argparse.Namespace) -> None:
    """An operator watching only some namespaces sees Secrets only there: with cluster policies
    on, their keys' namespace must be one of them, or every cluster key would go unseen."""
    patterns = [p for p in args.namespace or () if not p.startswith("!")]
    ns = args.cluster_keys_namespace
    if args.cluster_policies == "on" and patterns and not any(fnmatch.fnmatchcase(ns, p) for p in patterns):
        raise SystemExit(f"sluice operator: --cluster-keys-namespace: {ns} is not among the watched "
                         f"namespaces (--namespace {' '.join(patterns)}), so the keys of cluster "
                         "policies there would never be seen; watch it too")
