"""Admission webhooks at operator start-up: the serving certificate (cert-manager's, or
self-signed: shared by all replicas through a Secret, or in a local directory), the HTTPS
server, and the webhook configurations carrying its CA bundle. Every replica serves the
webhooks, the paused ones (kopf peering) included: admission does not wait for a leader."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from sluice_core.settingsform import split_host_port

from sluice_operator import webhook_config
from sluice_operator.certs import CertBundle, ensure_certificates, provided_bundle
from sluice_operator.certstore import ensure_shared_certificates, owned_by_configuration
from sluice_operator.injection.ownerevents import OwnerEvents
from sluice_operator.injection.redisca import RedisCaCopies
from sluice_operator.pod_admission import PolicyLookup
from sluice_operator.settings import OperatorSettings
from sluice_operator.webhook_server import WebhookServer

log = logging.getLogger("sluice.operator")
NATIVE_SIDECARS_SINCE = (1, 29)
"""Native sidecars (init containers with ``restartPolicy: Always``): beta and on by default
from Kubernetes 1.29, GA in 1.33. Older API servers drop the field (the sidecar would then be
an init container that never ends, and the pod would never start), so they get an ordinary one."""


def native_sidecars(api_client: Any) -> bool:
    """Does the API server take native sidecars? From its version (blocking: run it in a
    thread); False when it cannot be read (the ordinary container works everywhere)."""
    from kubernetes import client

    try:
        info = client.VersionApi(api_client).get_code()
        major = int(re.sub(r"\D.*", "", info.major) or 0)
        minor = int(re.sub(r"\D.*", "", info.minor) or 0)
    except Exception as exc:
        log.warning("cannot read the API server's version (%s): injecting the sidecar as an ordinary "
                    "container", exc)
        return False
    native = (major, minor) >= NATIVE_SIDECARS_SINCE
    log.info("API server %s.%s: injecting the sidecar as %s", major, minor,
             "a native sidecar (init container, restartPolicy Always)" if native else "an ordinary container")
    return native


async def current_certificates(settings: OperatorSettings, api_client: Any) -> CertBundle:
    """The certificate to serve now: cert-manager's files when mounted; else self-signed,
    shared through the Secret (several replicas) or kept locally; renewed when stale."""
    dns, ips = list(settings.webhook_dns_names), list(settings.webhook_ips)
    if settings.webhook_cert_secret and provided_bundle(settings.webhook_provided_cert_dir) is None:
        # several replicas: one certificate (and caBundle) for all, kept in a Secret
        return await asyncio.to_thread(
            ensure_shared_certificates, api_client, settings.webhook_cert_secret,
            settings.webhook_cert_dir, dns, ips)
    return await asyncio.to_thread(
        ensure_certificates, settings.webhook_cert_dir, dns, ips,
        provided_dir=settings.webhook_provided_cert_dir)


async def serve_webhooks(settings: OperatorSettings, api_client: Any,
                         policies: PolicyLookup | None = None) -> WebhookServer:
    """Certificates, the HTTPS server, the webhook configurations carrying the CA bundle, and a
    task that keeps the served certificate current (see :func:`keep_certificates_current`).
    ``policies``: those that may select a pod of a namespace (kopf's indexes), which decide
    what its sidecar does before its first config."""
    bundle = await current_certificates(settings, api_client)
    log.info("webhook certificate: %s (%s)", bundle.cert_path, bundle.mode)

    def namespace_labels(namespace: str) -> Mapping[str, str] | None:
        """Errors reach the server, which logs them and admits the pod with a warning."""
        from kubernetes import client

        ns = client.CoreV1Api(api_client).read_namespace(namespace)
        return dict((ns.metadata.labels if ns.metadata else None) or {})

    async def namespace_labels_async(namespace: str) -> Mapping[str, str] | None:
        return await asyncio.to_thread(namespace_labels, namespace)

    assert settings.webhook_listen  # the webhooks start only when it is set (handlers.py)
    host, port = split_host_port(settings.webhook_listen)
    injection = dataclasses.replace(settings.injection,
                                    native_sidecar=await asyncio.to_thread(native_sidecars, api_client))
    redis_ca = RedisCaCopies(api_client, injection.redis_ca_file) if injection.redis_ca_file else None
    server = WebhookServer(bundle.cert_path, bundle.key_path, injection=injection,
                           namespace_labels=namespace_labels_async, policies=policies, redis_ca=redis_ca,
                           events=OwnerEvents(api_client), host=host, port=port)
    await server.start()
    missing = await register(settings, api_client, bundle.ca_pem)
    if missing:
        _log_missing(missing)
    server.run_while_serving(keep_certificates_current(settings, api_client, server, bundle,
                                                       missing=missing))
    return server


# While a configuration is missing (--webhook-configurations=patch, before the Helm release has
# created it): the first tries come quickly, since Helm creates them a moment after the
# operator's Deployment and policies are refused until the CA bundle is in; one that stays
# missing (deleted by hand) is looked for every 10 s after a minute.
_RETRY_FIRST_S = 0.25
_RETRY_MAX_S = 1.0
_RETRY_SLOW_S = 10.0
_RETRY_SLOW_AFTER_S = 60.0


def _log_missing(missing: tuple[str, ...]) -> None:
    log.info("webhook configuration(s) %s missing: waiting for the Helm release to create them "
             "(--webhook-configurations=patch)", ", ".join(missing))


async def register(settings: OperatorSettings, api_client: Any, ca_pem: bytes) -> tuple[str, ...]:
    """Create or update the webhook configurations with ``ca_pem`` as their caBundle; with
    ``--webhook-configurations=patch`` only update those that exist. Returns the names of those
    missing (none: both written)."""
    if settings.webhook_endpoint is None:
        return ()
    manifests = [webhook_config.validating(settings.webhook_endpoint, ca_pem),
                 webhook_config.mutating(settings.webhook_endpoint, ca_pem,
                                         skip_namespaces=settings.skip_namespaces)]
    uids = await asyncio.to_thread(webhook_config.apply, api_client, manifests,
                                   create=settings.webhook_configurations == "create")
    if settings.webhook_cert_secret and uids.get(webhook_config.VALIDATING_NAME):
        # The Secret goes with the configuration that carries its CA (helm uninstall deletes
        # the chart's): the garbage collector removes it then (#12, defect 5).
        await asyncio.to_thread(owned_by_configuration, api_client, settings.webhook_cert_secret,
                                webhook_config.VALIDATING_NAME, uids[webhook_config.VALIDATING_NAME])
    missing = tuple(m["metadata"]["name"] for m in manifests if m["metadata"]["name"] not in uids)
    if not missing:
        log.info("webhook configurations %s and %s point at the operator",
                 webhook_config.VALIDATING_NAME, webhook_config.MUTATING_NAME)
    return missing


async def keep_certificates_current(settings: OperatorSettings, api_client: Any, server: WebhookServer,
                                    served: CertBundle, *, missing: tuple[str, ...] = ()) -> None:
    """Every ``webhook_cert_check_s``: look at the certificate again and serve a new one to new
    connections without a restart; re-apply the webhook configurations with their CA bundle.
    cert-manager rotates its mounted files in place (well before expiry); a self-signed
    certificate is renewed 30 days ahead, by this replica or, through the shared Secret, by
    another. When the CA changes, the configurations first get both CAs, then the server
    switches: the API server never meets a certificate it does not trust. While a configuration
    is ``missing`` (``--webhook-configurations=patch``), the configurations are re-applied every
    second or less (see ``_RETRY_*``) until it is there, the certificate still looked at on
    time."""
    loop = asyncio.get_running_loop()
    # What is served, as read when it was loaded: the files may be rewritten in place.
    served_fp = _fingerprint(served)
    registered_ca = served.ca_pem  # the CA bundle the configurations carry (serve_webhooks set it)
    next_check = loop.time() + settings.webhook_cert_check_s
    retry, missing_since = _RETRY_FIRST_S, loop.time()
    failure = ""  # the last error logged: one warning per new error, not one per try
    while True:
        wait = next_check - loop.time()
        if missing:
            slow = loop.time() - missing_since > _RETRY_SLOW_AFTER_S
            wait = min(wait, _RETRY_SLOW_S if slow else retry)
            retry = min(retry * 2, _RETRY_MAX_S)
        await asyncio.sleep(max(wait, 0.0))
        try:
            bundle = None
            if loop.time() >= next_check:
                next_check = loop.time() + settings.webhook_cert_check_s
                bundle = await current_certificates(settings, api_client)
                if _fingerprint(bundle) == served_fp:
                    bundle = None
                elif bundle.ca_pem != served.ca_pem:
                    registered_ca = bundle.ca_pem + served.ca_pem
            # Also puts the bundle back should something have dropped it (kubectl replace, helm
            # upgrade --force on the chart's configurations): policies are refused without it.
            now_missing = await register(settings, api_client, registered_ca)
            if now_missing and now_missing != missing:
                _log_missing(now_missing)
                retry, missing_since = _RETRY_FIRST_S, loop.time()
            missing = now_missing
            if bundle is not None:
                server.cert_file, server.key_file = bundle.cert_path, bundle.key_path
                server.reload_certificates()
                served, served_fp = bundle, _fingerprint(bundle)
                log.info("webhook certificate reloaded: %s (%s)", bundle.cert_path, bundle.mode)
            failure = ""
        except Exception as exc:  # keep serving the current one; try again next time
            if str(exc) != failure:
                log.warning("cannot refresh the webhook certificate or configurations (keeping "
                            "the current ones; trying again): %s", exc)
            failure = str(exc)


def _fingerprint(bundle: CertBundle) -> tuple[bytes, bytes, bytes]:
    return bundle.cert_path.read_bytes(), bundle.key_path.read_bytes(), bundle.ca_pem
