"""Settings of ``sluice analytics``: every flag also reads ``SLUICE_ANALYTICS_<FLAG>``."""

from __future__ import annotations

import ipaddress
import os

from sluice_core.redisurl import parse_redis_url
from sluice_core.settingsform import LOG_LEVELS, setting, settings_form, split_host_port


def _redis_url(text: str) -> str:
    parse_redis_url(text)  # ValueError names what is wrong, never the password
    return text


def database_url(text: str) -> str:
    """``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB``, checked, kept as text
    (the async driver is chosen by :mod:`sluice_analytics.database`)."""
    scheme = text.partition("://")[0].lower()
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ValueError("expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    if scheme == "sqlite" and not text.startswith("sqlite:///"):
        raise ValueError("a SQLite URL is sqlite:///PATH (three slashes, then the file's path)")
    return text


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(text: str) -> tuple[IPNetwork, ...]:
    """``--alert-webhook-allow``: CIDRs (or addresses), comma-separated; ValueError names a bad one."""
    nets: list[IPNetwork] = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not a CIDR or an IP address") from None
    return tuple(nets)


def _allow(text: str) -> str:
    parse_allow(text)  # ValueError names the bad entry
    return text


def _at_least_a_day(text: str) -> float:
    hours = float(text)
    if not hours >= 24:
        raise ValueError(f"must be at least 24 (hours), got {text}")
    return hours


def _host_port(text: str) -> str:
    split_host_port(text)
    return text


@settings_form(env_prefix="SLUICE_ANALYTICS_")
class AnalyticsSettings:
    """Documented in README.md ("Usage collector"), whose table is made from these fields."""

    redis: str = setting(help="Redis URL the sidecars write usage windows to (`redis://`, `rediss://`, "
                              "`redis+sentinel://`, `redis+cluster://`)", parse=_redis_url)
    database: str = setting(
        default="sqlite:///sluice-usage.db",
        help="where the rollups are kept: `sqlite:///PATH` (one file, one replica or a few on one "
             "host) or `postgresql://USER:PASSWORD@HOST:PORT/DB` (production, any number of replicas)",
        parse=database_url)
    consumer: str = setting(
        default="", help="this replica's consumer name in the group (stable across restarts of one "
                         "replica, so it re-reads what it left unacknowledged at once)",
        shown="the host name")
    batch: int = setting(default=200, help="stream entries (windows) read and applied per SQL transaction",
                         positive=True)
    block_ms: int = setting(default=2000, help="how long one read waits for new entries", positive=True)
    claim_idle_s: float = setting(
        default=60.0, help="take over entries another replica left unacknowledged this long (it died)",
        positive=True)
    rollup_interval_s: float = setting(default=60.0, help="how often the rollup and retention job runs",
                                       positive=True)
    rollup_delay_s: float = setting(
        default=120.0, help="an hour (a day) is rolled up this long after it ends; a window arriving "
                            "later is added to the rolled-up tables directly", positive=True)
    keep_minutes_h: float = setting(
        default=48.0, help="retention of the per-minute table, hours (at least 24: daily near-limit "
                           "alerts and the usage summary read the day from it)", parse=_at_least_a_day)
    keep_hours_d: float = setting(default=90.0, help="retention of the per-hour table, days", positive=True)
    keep_days_d: float = setting(default=400.0, help="retention of the per-day table, days", positive=True)
    keep_applied_h: float = setting(
        default=48.0, help="how long applied windows are remembered (duplicates caught); a window "
                           "ending longer ago than this is refused as stale and counted", positive=True)
    forget_consumers_idle_h: float = setting(
        default=24.0, help="delete another replica's consumer from the group once it has had nothing "
                           "pending and been idle this long, hours (each restarted pod joins under a new "
                           "name; checked every `--rollup-interval-s`; never this replica's own)",
        positive=True)
    summary_interval_s: float = setting(
        default=60.0, help="how often each policy's last hour (requests, limited, the most limited "
                           "clients) is written to Redis for the operator's `status.usage` (one "
                           "replica per interval; kept three intervals)", positive=True)
    delete_batch: int = setting(default=50, help="retention deletes at most this many periods per run, "
                                                 "one transaction each", positive=True)
    listen: str = setting(default="0.0.0.0:9092", help="HOST:PORT for `/metrics`, `/healthz`, `/openapi.json` and the API (`/v1/...`)",
                          parse=_host_port, metavar="HOST:PORT")
    api_auth: str = setting(
        default="token", choices=("token", "kubernetes"),
        help="who may call the API (`/v1/...`): `token` (one bearer token from `--api-token-file`) "
             "or `kubernetes` (TokenReview + SubjectAccessReview on the policy)")
    api_token_file: str = setting(
        default="", help="file holding the API's bearer token (`--api-auth token`); without it every "
                         "API call is refused (401)", metavar="PATH", shown="none")
    kubeconfig: str = setting(
        default="", help="kubeconfig for `--api-auth kubernetes` (reviews, Events)", metavar="PATH",
        shown="the pod's in-cluster account")
    alerts_interval_s: float = setting(
        default=60.0, help="how often near-limit alerts (policies' `spec.alerts`) are looked for",
        positive=True)
    alert_webhook_secret_file: str = setting(
        default="", help="file holding the secret that signs near-limit webhook bodies "
                         "(`X-Sluice-Signature: sha256=<HMAC>`)", metavar="PATH", shown="none: unsigned")
    alert_webhook_secret_namespace: str = setting(
        default="", metavar="NAMESPACE", shown="the pod's own namespace",
        help="where the Secrets named by ClusterRateLimitPolicies' `webhook.secretRef` are (a "
             "RateLimitPolicy's are in its own namespace); the collector reads them with "
             "`--api-auth kubernetes` and needs `get` on each")
    alert_webhook_timeout_s: float = setting(default=5.0, help="timeout of one webhook attempt",
                                             positive=True)
    alert_webhook_attempts: int = setting(
        default=4, help="attempts per near-limit webhook (1 s, then twice as long, between them); a "
                        "receiver's 4xx but 429 ends them", positive=True)
    alert_webhook_allow: str = setting(
        default="", metavar="CIDR[,CIDR...]", shown="none: only globally routable addresses",
        help="near-limit webhooks may reach these networks too (a receiver in the cluster or on a "
             "private network); otherwise every address that is not globally routable is refused "
             "(private, shared, loopback, link-local, unique-local, reserved), after resolution",
        parse=_allow)
    alert_max_per_period: int = setting(
        default=100, help="clients alerted per policy, alert and period at most; the rest are counted "
                          "(`sluice_analytics_near_limit_suppressed_total`), not sent", positive=True)
    log_level: str = setting(default="info", help="`debug`, `info`, `warning` or `error`",
                             choices=LOG_LEVELS, fold_case=True)

    def consumer_name(self) -> str:
        return self.consumer or os.uname().nodename
