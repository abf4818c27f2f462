"""Admission webhooks at operator start-up: the serving certificate (cert-manager's, or
self-signed: shared by all replicas through a Secret, or in a local directory), the HTTPS
server, and the webhook configurations carrying its CA bundle. Every replica serves the
webhooks, the paused ones (kopf peering) included: admission does not wait for a leader."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from sluice_operator import webhook_config
from sluice_operator.certs import ensure_certificates, provided_bundle
from sluice_operator.certstore import ensure_shared_certificates
from sluice_operator.settings import OperatorSettings
from sluice_operator.webhook_server import WebhookServer

log = logging.getLogger("sluice.operator")


async def serve_webhooks(settings: OperatorSettings, api_client: Any) -> WebhookServer:
    """Certificates (cert-manager's, the shared Secret's, or a local self-signed one), the HTTPS
    server, and the webhook configurations carrying its CA bundle."""
    dns, ips = list(settings.webhook_dns_names), list(settings.webhook_ips)
    if settings.webhook_cert_secret and provided_bundle(settings.webhook_provided_cert_dir) is None:
        # several replicas: one certificate (and caBundle) for all, kept in a Secret
        bundle = await asyncio.to_thread(
            ensure_shared_certificates, api_client, settings.webhook_cert_secret,
            settings.webhook_cert_dir, dns, ips)
    else:
        bundle = await asyncio.to_thread(
            ensure_certificates, settings.webhook_cert_dir, dns, ips,
            provided_dir=settings.webhook_provided_cert_dir)
    log.info("webhook certificate: %s (%s)", bundle.cert_path, bundle.mode)

    def namespace_labels(namespace: str) -> Mapping[str, str] | None:
        from kubernetes import client

        try:
            ns = client.CoreV1Api(api_client).read_namespace(namespace)
        except Exception as exc:  # the injector then decides on the pod's own labels
            log.warning("cannot read labels of namespace %s: %s", namespace, exc)
            return None
        return dict((ns.metadata.labels if ns.metadata else None) or {})

    async def namespace_labels_async(namespace: str) -> Mapping[str, str] | None:
        return await asyncio.to_thread(namespace_labels, namespace)

    host, _, port = (settings.webhook_listen or "").rpartition(":")
    server = WebhookServer(bundle.cert_path, bundle.key_path, injection=settings.injection,
                           namespace_labels=namespace_labels_async, host=host or "0.0.0.0",
                           port=int(port))
    await server.start()
    if settings.webhook_endpoint is not None:
        manifests = [webhook_config.validating(settings.webhook_endpoint, bundle.ca_pem),
                     webhook_config.mutating(settings.webhook_endpoint, bundle.ca_pem,
                                             skip_namespaces=settings.skip_namespaces)]
        await asyncio.to_thread(webhook_config.apply, api_client, manifests)
        log.info("webhook configurations %s and %s point at the operator",
                 webhook_config.VALIDATING_NAME, webhook_config.MUTATING_NAME)
    return server
