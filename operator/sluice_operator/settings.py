"""Operator settings: every flag of ``sluice operator`` also reads ``SLUICE_OPERATOR_<FLAG>``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.webhook_config import Endpoint

CLUSTER_KEYS_NAMESPACE = "sluice-system"
"""Default namespace of the key Secrets of ClusterRateLimitPolicies (``--cluster-keys-namespace``,
``SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE``); ``sluice keys --cluster-policy`` follows it."""


@dataclass(frozen=True)
class OperatorSettings:
    redis: str
    """Redis URL the sidecars read (redis://, rediss://, redis+sentinel://, redis+cluster://)."""
    resync_interval_s: float = 30.0
    """Timer: re-push config that Redis lost or that differs, refresh status (Enforced)."""
    heartbeat_stale_s: float = 30.0
    """A sidecar heartbeat older than this no longer counts as enforcing."""
    namespaces: tuple[str, ...] = ()
    """Watch only these namespaces (empty: the whole cluster)."""
    cluster_keys_namespace: str = CLUSTER_KEYS_NAMESPACE
    """Where the key Secrets of ClusterRateLimitPolicies live (label ``sluice.dev/cluster-policy``):
    a cluster-wide key is granted only by those who may write Secrets in this namespace."""
    cluster_policies: bool | None = None
    """Serve ClusterRateLimitPolicies (watches Namespaces for their namespaceSelector). None: only
    when the operator is cluster-wide, so that operators restricted to some namespaces never
    fight over the cluster-scoped objects."""
    webhook_listen: str | None = None
    """HOST:PORT for the admission webhooks (HTTPS); None: no webhooks are served."""
    webhook_cert_dir: str = "/tmp/sluice-webhook-certs"
    """Where a self-signed serving certificate (and its CA) is kept when none is provided."""
    webhook_provided_cert_dir: str | None = "/etc/sluice/webhook-certs"
    """cert-manager's mounted Secret (tls.crt, tls.key, ca.crt): used when present."""
    webhook_cert_secret: str | None = None
    """NAMESPACE/NAME of the Secret through which all replicas share the self-signed certificate
    (the first creates it); None: each process keeps its own in ``webhook_cert_dir``."""
    webhook_cert_check_s: float = 3600.0
    """How often the served certificate is looked at again (renewed or rotated files are then
    served to new connections without a restart)."""
    webhook_dns_names: tuple[str, ...] = ()
    """Names the serving certificate covers (the webhook Service's DNS names)."""
    webhook_ips: tuple[str, ...] = ()
    webhook_endpoint: Endpoint | None = None
    """How the API server reaches the webhooks; when set, the operator creates or updates the
    Validating/MutatingWebhookConfigurations with the CA bundle."""
    skip_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    """Pods in these namespaces are never sent to the injector."""
    injection: InjectionSettings = field(default_factory=InjectionSettings)
