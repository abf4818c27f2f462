"""Operator settings: every flag of ``sluice operator`` also reads ``SLUICE_OPERATOR_<FLAG>``
(``--namespace``: ``SLUICE_OPERATOR_WATCH_NAMESPACES``)."""

from __future__ import annotations

from dataclasses import field

from sluice_core.settingsform import LOG_LEVELS, setting, settings_form, split_host_port
from sluice_core.usagesummary import INTERVAL_S

from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.injection.values import port, redis_url
from sluice_operator.webhook_config import Endpoint

CLUSTER_KEYS_NAMESPACE = "sluice-system"
"""Default namespace of the key Secrets of ClusterRateLimitPolicies (``--cluster-keys-namespace``,
``SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE``); ``sluice keys --cluster-policy`` follows it."""
CLUSTER_POLICIES = {"auto": None, "on": True, "off": False}
EMBED_KEYS = ("auto", "always", "never")
"""``--embed-keys`` (:meth:`sluice_operator.reconcile.Reconciler.embeds_keys`)."""
OPERATOR_LOG_LEVELS = (*LOG_LEVELS, "critical")
"""The operator's ``--log-level`` (the chart's ``operator.logLevel`` allows these, any case);
the sidecar has no ``critical``."""


def _secret_ref(text: str) -> str:
    # Imported here, not at the top: certstore loads cryptography (about 25 ms), and `sluice
    # keys` imports this module (for CLUSTER_KEYS_NAMESPACE) without ever checking a Secret ref.
    from sluice_operator.certstore import parse_secret_ref

    parse_secret_ref(text)
    return text


def host_port(text: str) -> str:
    """``HOST:PORT`` to listen on, checked (:func:`settingsform.split_host_port`), kept as text."""
    split_host_port(text)
    return text


def service_ref(text: str) -> str:
    """``NAMESPACE/NAME[:PORT]``, the webhook Service."""
    ref, colon, number = text.partition(":")
    ns, sep, name = ref.partition("/")
    if not (sep and ns and name) or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME[:PORT], got {text!r}")
    if colon:
        port(number)
    return text


@settings_form(env_prefix="SLUICE_OPERATOR_")
class OperatorSettings:
    """Documented in README.md ("Operator"), whose table is made from these fields. Fields
    without ``setting`` are not flags: the command line derives them, tests set them."""

    redis: str = setting(help="Redis URL the sidecars read (`redis://`, `rediss://`, `redis+sentinel://`, "
                              "`redis+cluster://`)", parse=redis_url, chart="externalRedis.url")
    resync_interval_s: float = setting(
        default=30.0, help="how often Redis is checked for config it lost (then re-pushed) and sidecars are counted (status `Enforced`)",
        positive=True, chart="operator.resyncIntervalSeconds")
    namespaces: tuple[str, ...] = setting(
        default=(), help="watch only this namespace (repeatable, shell patterns; `!PATTERN` excludes)",
        flag="namespace", env="WATCH_NAMESPACES", repeatable=True, parse=tuple, shown="the whole cluster")
    cluster_keys_namespace: str = setting(
        default=CLUSTER_KEYS_NAMESPACE, help="where the key Secrets of ClusterRateLimitPolicies live (label "
                                "`sluice.dev/cluster-policy`): a cluster-wide key is granted only by "
                                "those who may write Secrets in this namespace")
    cluster_policies: bool | None = setting(
        default=None, help="serve ClusterRateLimitPolicies (watches Namespaces for their namespaceSelector); "
              "`auto`: only when watching the whole cluster, so that operators restricted with "
              "`--namespace` never fight over the cluster-scoped objects",
        choices=tuple(CLUSTER_POLICIES), parse=CLUSTER_POLICIES.__getitem__, kind=str, shown="`auto`")
    peering: str | None = setting(
        default=None, help="kopf peering through the `ClusterKopfPeering` NAME, for several replicas (one "
              "reconciles, the oldest); without it the operator runs standalone",
        metavar="NAME", chart="peering.name")
    peering_lifetime_s: int = setting(
        default=60, help="with `--peering`: how long a replica's keep-alive counts; a replica that dies without "
            "handing over is taken over after at most this long", positive=True,
        chart="peering.lifetimeSeconds")
    liveness: str = setting(default="http://0.0.0.0:8080/healthz", help="kopf's liveness endpoint")
    metrics_listen: str = setting(default="0.0.0.0:9091", help="HOST:PORT for the operator's `/metrics`",
                                  parse=host_port, metavar="HOST:PORT")
    webhook_listen: str | None = setting(
        default=None, help="HOST:PORT to serve the admission webhooks on (HTTPS); unset: no webhooks",
        parse=host_port, metavar="HOST:PORT")
    webhook_service: str | None = setting(
        default=None, help="NAMESPACE/NAME[:PORT] of the Service in front of the webhooks: the operator then "
              "keeps the webhook configurations (with the CA bundle) up to date",
        parse=service_ref, metavar="NS/NAME[:PORT]")
    webhook_configurations: str = setting(
        default="create", help="`create`: create the webhook configurations when missing, else patch in the "
              "CA bundle and endpoint (chart-less and local runs); `patch`: only patch them, waiting for "
              "those a Helm release creates (the chart's: an operator that creates them races `helm "
              "install`, which then fails with \"already exists\")", choices=("create", "patch"))
    webhook_url: str | None = setting(
        default=None, help="instead of a Service: the `https://` URL the API server calls (local runs)")
    webhook_cert_dir: str = setting(
        default="/tmp/sluice-webhook-certs", help="where a self-signed serving certificate (and its CA) is kept "
                                     "when none is provided")
    webhook_provided_cert_dir: str | None = setting(
        default="/etc/sluice/webhook-certs", help="cert-manager's mounted Secret (`tls.crt`, `tls.key`, "
                                     "`ca.crt`): used when present")
    webhook_cert_secret: str | None = setting(
        default=None, help="NAMESPACE/NAME of the Secret through which all replicas share the self-signed "
              "certificate (the first creates it); unset: each replica keeps its own in "
              "`--webhook-cert-dir`", parse=_secret_ref, metavar="NAMESPACE/NAME")
    log_level: str = setting(default="info", help="`debug`, `info`, `warning`, `error` or `critical`",
                             choices=OPERATOR_LOG_LEVELS,
                             fold_case=True, chart="operator.logLevel")
    embed_keys: str = setting(
        default="auto", help="whether config documents also carry their policies' API keys (what sidecars "
              "from before Redis grants read): `auto` while a sidecar's heartbeat says it cannot read grants, "
              "and as the document already does where no sidecar beats; `always` for sidecars that send no "
              "heartbeat (cluster mode without `--pod-name`) or before rolling sidecars back; `never` once "
              "every sidecar reads grants", choices=EMBED_KEYS, chart="operator.embedKeys")
    heartbeat_stale_s: float = 30.0
    """A sidecar heartbeat older than this no longer counts as enforcing."""
    usage_status_min_s: float = INTERVAL_S
    """The least time between two writes of one policy's ``status.usage`` (the interval at which
    the collector writes its summary)."""
    webhook_cert_check_s: float = 3600.0
    """How often the served certificate is looked at again (renewed or rotated files are then
    served to new connections without a restart)."""
    webhook_dns_names: tuple[str, ...] = ()
    """Names the serving certificate covers (the webhook Service's DNS names)."""
    webhook_ips: tuple[str, ...] = ()
    webhook_endpoint: Endpoint | None = None
    """How the API server reaches the webhooks (from ``webhook_service`` or ``webhook_url``);
    when set, the operator creates or updates the Validating/MutatingWebhookConfigurations with
    the CA bundle."""
    skip_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    """Pods in these namespaces are never sent to the injector."""
    injection: InjectionSettings = field(default_factory=lambda: InjectionSettings())
