"""``sluice operator``: reconcile RateLimitPolicies and key Secrets into Redis (kopf)."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
from dataclasses import replace
from typing import Any

from sluice_core import settingsform

from sluice_operator.injection import settings as injection
from sluice_operator.settings import OperatorSettings
from sluice_operator.webhook_config import Endpoint

HELP = "reconcile RateLimitPolicies and key Secrets into Redis (kopf)"  # one line in `sluice --help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`OperatorSettings` and, in a group, the injector's ``--sidecar-*``."""
    settingsform.add_arguments(parser, OperatorSettings)
    settingsform.add_arguments(parser.add_argument_group(
        "injected sidecar (the mutating webhook's container; an empty value means the default)"),
        injection.InjectionSettings)


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    """Every flag checked before anything connects: SystemExit("sluice operator: --flag: reason")
    on the first bad one."""
    try:
        settings = settingsform.load(OperatorSettings, args, settingsform.EXPECTED)
        check_cluster_keys_namespace(settings)
        return replace(settings, injection=injection.from_args(args, settings.redis),
                       **_webhook_endpoint(settings))
    except settingsform.SettingError as exc:
        raise SystemExit(f"sluice operator: {exc}") from None


def _webhook_endpoint(settings: OperatorSettings) -> dict[str, Any]:
    """How the API server reaches the webhooks, and the names their certificate covers."""
    endpoint = None
    dns: tuple[str, ...] = ()
    if settings.webhook_service:
        ns, _, rest = settings.webhook_service.partition("/")
        name, _, port = rest.partition(":")
        endpoint = Endpoint(service_namespace=ns, service_name=name, service_port=int(port or 443))
        dns = (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local")
    elif settings.webhook_url:
        endpoint = Endpoint(url=settings.webhook_url)
    return {"webhook_endpoint": endpoint, "webhook_dns_names": dns or ("localhost",),
            "webhook_ips": ("127.0.0.1",)}


def run(args: argparse.Namespace) -> int:
    import kopf
    from sluice_core import configstore

    from sluice_operator.handlers import build_registry
    from sluice_operator.reconcile import Reconciler

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prometheus_client import start_http_server

    from sluice_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    host, port = settingsform.split_host_port(settings.metrics_listen)
    start_http_server(port, addr=host, registry=metrics.registry)
    reconciler = Reconciler(configstore.connect(settings.redis), metrics, scope=operator_scope(settings))
    peering: dict[str, Any] = {}
    gate = None
    if settings.peering:
        from kopf._core.engines.peering import detect_own_id

        from sluice_operator.kube import default_api_client
        from sluice_operator.peering import PeeringGate, peering_priority

        # The resync task asks kopf's question (is this replica the active one?) with kopf's
        # identity and priority for this replica, so both are chosen here.
        peering = {"identity": detect_own_id(manual=False), "priority": peering_priority()}
        gate = PeeringGate(settings.peering, peering["identity"], peering["priority"], default_api_client)
    registry = build_registry(settings, reconciler, gate=gate)
    # A registry of our own has no login handler: use the kubernetes client's credentials
    # (in-cluster ServiceAccount, else the kubeconfig).
    if settings.namespaces:
        kopf.on.login(registry=registry)(kopf.login_via_client)
    else:  # cluster-wide: a bounded pool of API connections (see kubelogin)
        from sluice_operator.kubelogin import login_pooled

        kopf.on.login(registry=registry)(login_pooled)
    if settings.peering:
        from sluice_operator.peering import configure_peering

        configure_peering(registry, settings.peering, settings.peering_lifetime_s)
    asyncio.run(kopf.operator(
        registry=registry, clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
        standalone=settings.peering is None, peering_name=settings.peering,
        liveness_endpoint=settings.liveness, **peering))
    return 0


def operator_scope(settings: OperatorSettings) -> str:
    """What this operator serves, naming the count of its writes in Redis: operators restricted
    to different namespaces keep their own counts (replicas of one operator share theirs)."""
    return " ".join(settings.namespaces) or "*"


def check_cluster_keys_namespace(settings: OperatorSettings) -> None:
    """An operator watching only some namespaces sees Secrets only there: with cluster policies
    on, their keys' namespace must be one of them, or every cluster key would go unseen."""
    patterns = [p for p in settings.namespaces if not p.startswith("!")]
    ns = settings.cluster_keys_namespace
    if settings.cluster_policies and patterns and not any(fnmatch.fnmatchcase(ns, p) for p in patterns):
        raise SystemExit(f"sluice operator: --cluster-keys-namespace: {ns} is not among the watched "
                         f"namespaces (--namespace {' '.join(patterns)}), so the keys of cluster "
                         "policies there would never be seen; watch it too")
