"""``sluice analytics``: the usage collector (``run``, the default), ``migrate`` (bring the
schema to the current revision and exit) and ``rollup`` (one rollup and retention pass)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from sluice_core import configstore, settingsform

from sluice_analytics import database, migrate
from sluice_analytics.api import ApiContext
from sluice_analytics.auth import (
    Access,
    Authorizer,
    Denied,
    KubernetesAuth,
    TokenFile,
    load_api_server,
)
from sluice_analytics.collector import Collector
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import Crossing, NearLimitAlerts
from sluice_analytics.server import serve
from sluice_analytics.settings import AnalyticsSettings
from sluice_analytics.stream import UsageStream
from sluice_analytics.webhooks import QueuedDelivery, WebhookSender, parse_allow
from sluice_analytics.webhooksecrets import WebhookSecrets, own_namespace

HELP = "collect usage windows from Redis into SQL rollups (SQLite or PostgreSQL)"
log = logging.getLogger("sluice.analytics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("run", "migrate", "rollup"), default="run",
                        help="run the collector (default; migrates first), only migrate, or run "
                             "one rollup and retention pass")
    settingsform.add_arguments(parser, AnalyticsSettings)


def settings_from_args(args: argparse.Namespace) -> AnalyticsSettings:
    try:
        return settingsform.load(AnalyticsSettings, args, settingsform.EXPECTED)
    except settingsform.SettingError as exc:
        raise SystemExit(f"sluice analytics: {exc}") from None


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(settings, args.action))


async def _main(settings: AnalyticsSettings, action: str) -> int:
    engine = database.connect(settings.database)
    try:
        before = await migrate.current(engine)
        await migrate.upgrade(engine)
        after = await migrate.current(engine)
        if before != after:
            log.info("database %s migrated from %s to %s", database.shown(settings.database), before, after)
        if action == "migrate":
            return 0
        async with configstore.connect(settings.redis) as client:
            stream = UsageStream(client, settings.consumer_name(), block_ms=settings.block_ms,
                                 claim_idle_s=settings.claim_idle_s)
            metrics = AnalyticsMetrics()
            auth = authorizer(settings) if action != "rollup" else None
            secrets = WebhookSecrets(auth if isinstance(auth, KubernetesAuth) else None,
                                     own_namespace(settings.alert_webhook_secret_namespace))
            sender = WebhookSender(metrics, timeout_s=settings.alert_webhook_timeout_s,
                                   attempts=settings.alert_webhook_attempts, secret=_secret(settings),
                                   allow=parse_allow(settings.alert_webhook_allow), secrets=secrets)
            deliver: list[Callable[[Crossing], Awaitable[None]]] = [sender.deliver]
            loops = [sender.run]
            if isinstance(auth, KubernetesAuth):
                events = QueuedDelivery(_event_on_policy(auth), metrics, "event")
                deliver.append(events.deliver)
                loops.append(events.run)
            collector = Collector(settings, engine, stream, metrics, side_loops=loops,
                                  near_limit=NearLimitAlerts(engine, client, deliver,
                                                             max_per_period=settings.alert_max_per_period))
            if action == "rollup":
                result = await collector.rollup_once()
                print(f"rolled up {result.rolled}, deleted {result.deleted}")
                return 0
            assert auth is not None
            await _serve(settings, collector, ApiContext(engine, auth, client))
        return 0
    finally:
        await engine.dispose()


def _secret(settings: AnalyticsSettings) -> bytes | None:
    if not settings.alert_webhook_secret_file:
        return None
    try:
        with open(settings.alert_webhook_secret_file, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"sluice analytics: --alert-webhook-secret-file: {exc.strerror}") from None
    if not secret:
        raise SystemExit("sluice analytics: --alert-webhook-secret-file is empty")
    return secret


def _event_on_policy(auth: KubernetesAuth) -> Callable[[Crossing], Awaitable[None]]:
    """Deliver a near-limit alert as a Warning Event on its policy (cluster mode)."""

    async def deliver(c: Crossing) -> None:
        ref = f"{c.namespace}/{c.name}"
        try:
            await auth.event(Access("get", "usage", c.namespace, ref), "NearLimit", c.message(), kind="Warning")
        except Denied as exc:  # best effort: the alert is recorded, its webhook queued
            log.warning("near-limit alert: the Event on %s could not be written: %s", ref, exc.detail)

    return deliver


def authorizer(settings: AnalyticsSettings) -> Authorizer:
    try:
        if settings.api_auth == "kubernetes":
            return KubernetesAuth(load_api_server(settings.kubeconfig or None))
        auth = TokenFile(settings.api_token_file or None)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"sluice analytics: API auth: {exc}") from None
    if not settings.api_token_file:
        log.warning("sluice analytics: no --api-token-file: every API call is refused (401)")
    return auth


async def _serve(settings: AnalyticsSettings, collector: Collector, api: ApiContext) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = settingsform.split_host_port(settings.listen)
    runner, bound = await serve(collector, host, port, stale_s=max(30.0, settings.block_ms / 1000 * 5), api=api)
    log.info("sluice analytics: consumer %s, database %s, /metrics and /healthz on %s:%d",
             collector.stream.consumer, database.shown(settings.database), host, bound)
    try:
        with contextlib.suppress(Exception):
            await collector.stream.ensure_group()  # else the first read makes it (Redis may be away)
        await collector.run(stop)
    finally:
        await runner.cleanup()
        await api.auth.close()
