"""The self-signed webhook certificate shared by every replica through a Kubernetes Secret.

Without cert-manager, each replica generating its own CA would make the replicas overwrite
each other's ``caBundle`` in the webhook configurations, and the API server would then refuse
the certificate of every replica but the last. Instead the CA and the serving certificate live
in one Secret (``kubernetes.io/tls``: ``tls.crt``, ``tls.key``, ``ca.crt``, plus ``ca.key`` so
that a renewal keeps the CA) and every replica serves that:

- absent: generate, ``create``; on 409 AlreadyExists another replica won the race: read theirs;
- present and good (covers the names, not within ``renew_before`` of expiry): use it as it is;
- present but stale: issue a new serving certificate (from the same CA while it stays valid, so
  ``caBundle`` does not change and replicas still serving the old certificate keep working),
  ``replace`` it with the ``resourceVersion`` that was read; on 409 Conflict another replica
  renewed first: read again, and use theirs when it is good.

The renewed certificate covers the names it covered before as well as this replica's, so that
replicas configured with different names (during a rollout) do not take turns replacing it.
The files the TLS server loads are then written into the local directory.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sluice_operator.certs import (
    CA_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    KEY_FILE,
    RENEW_BEFORE,
    VALIDITY,
    CertBundle,
    CertMaterial,
    certificate_names,
    issue,
    reusable,
    write_material,
)

log = logging.getLogger("sluice.operator")
MANAGED_BY = {"app.kubernetes.io/managed-by": "sluice-operator"}
ATTEMPTS = 8  # each lost race means another replica wrote a good certificate: 2 are plenty


def parse_secret_ref(ref: str) -> tuple[str, str]:
    """``NAMESPACE/NAME`` -> (namespace, name)."""
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME, got {ref!r}")
    return ns, name


def ensure_shared_certificates(
    api_client: Any,
    secret: str,
    directory: str | Path,
    dns_names: Sequence[str],
    ips: Sequence[str] = (),
    *,
    validity: dt.timedelta = VALIDITY,
    renew_before: dt.timedelta = RENEW_BEFORE,
) -> CertBundle:
    """The certificate in Secret ``secret`` (``NAMESPACE/NAME``), created or renewed as needed,
    written to ``directory`` for the TLS server (blocking: run it in a thread)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace, name = parse_secret_ref(secret)
    ips = [str(ipaddress.ip_address(i)) for i in ips]  # as the certificate spells them
    api = client.CoreV1Api(api_client)
    for _ in range(ATTEMPTS):
        now = dt.datetime.now(dt.UTC)
        stored = _read(api, namespace, name)
        current = _material(stored) if stored is not None else None
        if current is not None and reusable(current, dns_names, ips, now + renew_before):
            log.info("webhook certificate from Secret %s", secret)
            return write_material(Path(directory), current, "secret")
        have_dns, have_ips = certificate_names(current) if current else (set(), set())
        material = issue([*dns_names, *sorted(have_dns - set(dns_names))],
                         [*ips, *sorted(have_ips - set(ips))],
                         previous=current, now=now, validity=validity, renew_before=renew_before)
        try:
            if stored is None:
                api.create_namespaced_secret(namespace, _body(namespace, name, material, None))
                log.info("webhook certificate created in Secret %s", secret)
            else:  # resourceVersion: the API server refuses it if another replica wrote since
                api.replace_namespaced_secret(name, namespace,
                                              _body(namespace, name, material, stored))
                log.info("webhook certificate in Secret %s renewed%s", secret,
                         "" if current and material.ca_cert == current.ca_cert else " with a new CA")
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("another replica wrote Secret %s first: reading theirs", secret)
            continue
        return write_material(Path(directory), material, "secret")
    raise RuntimeError(f"Secret {secret} kept changing: gave up after {ATTEMPTS} attempts")


OWNER_KIND = ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration")


def owned_by_configuration(api_client: Any, secret: str, owner: str, uid: str) -> bool:
    """Make the ValidatingWebhookConfiguration ``owner`` (with ``uid``) the owner of the Secret, so that the garbage collector deletes the Secret with it: the Secret
    is the operator's (Helm does not know it) and used to outlive ``helm uninstall``. True when
    it was written; nothing when it already is (a GET), or the Secret is not there (yet).
    Blocking: run it in a thread. An update with the read ``resourceVersion``: a replica that
    renews the certificate meanwhile wins, and the next call sets the owner again."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace, name = parse_secret_ref(secret)
    api = client.CoreV1Api(api_client)
    stored = _read(api, namespace, name)
    if stored is None:
        return False
    refs = list(stored.metadata.owner_references or [])
    if any(r.uid == uid for r in refs):
        return False
    api_version, kind = OWNER_KIND
    refs = [r for r in refs if not (r.kind == kind and r.name == owner)]  # an earlier install's
    refs.append(client.V1OwnerReference(api_version=api_version, kind=kind, name=owner, uid=uid))
    stored.metadata.owner_references = refs
    try:
        api.replace_namespaced_secret(name, namespace, stored)
    except ApiException as exc:
        if exc.status != 409:
            raise
        log.info("Secret %s changed while its owner was set: set again at the next check", secret)
        return False
    log.info("Secret %s now goes with ValidatingWebhookConfiguration %s", secret, owner)
    return True


def _read(api: Any, namespace: str, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _material(secret: Any) -> CertMaterial:
    data = secret.data or {}

    def field(key: str) -> bytes:
        try:
            return base64.b64decode(data.get(key) or "")
        except ValueError:
            return b""

    return CertMaterial(ca_cert=field(CA_FILE), ca_key=field(CA_KEY_FILE), cert=field(CERT_FILE),
                        key=field(KEY_FILE))


def _body(namespace: str, name: str, material: CertMaterial, stored: Any) -> Any:
    """The Secret to write; on a replace, the stored one's labels, annotations, owners, type and
    resourceVersion are kept (the type is immutable, the version makes the write conditional)."""
    from kubernetes import client

    meta = client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(MANAGED_BY))
    secret_type = "kubernetes.io/tls"
    if stored is not None:
        sm = stored.metadata
        meta.labels = {**(sm.labels or {}), **MANAGED_BY}
        meta.annotations = dict(sm.annotations) if sm.annotations else None
        meta.resource_version = sm.resource_version
        meta.owner_references = sm.owner_references  # the configuration it goes with (owned_by_configuration)
        secret_type = stored.type or secret_type
    data: dict[str, bytes | str] = {k: base64.b64encode(v).decode() for k, v in (
        (CERT_FILE, material.cert), (KEY_FILE, material.key),
        (CA_FILE, material.ca_cert), (CA_KEY_FILE, material.ca_key))}
    return client.V1Secret(api_version="v1", kind="Secret", metadata=meta, type=secret_type,
                           data=data)
