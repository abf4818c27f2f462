"""Near-limit alerts (#11 §3): a client past a share of its tier's hourly or daily allowance is
found in the real store (SQLite and PostgreSQL), recorded once per client and period even with
two collector replicas, and POSTed to a real HTTP receiver: signed, retried on 5xx, never sent
to an address the collector must not call."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from sluice_analytics import store
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import Crossing, NearLimitAlerts
from sluice_analytics.settings import parse_allow
from sluice_analytics.webhooks import WebhookSender
from sluice_core import configstore, keyschema
from sluice_core.configdoc import build_doc
from sluice_core.parse import parse_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from support.loopback_app import serving
from support.near_limit import Receiver, receiving, running, sent, window
from support.polling import wait_for

HOUR = 1_790_002_800  # the start of a UTC hour (a multiple of 3600)
NOW = HOUR + 1800
SECRET = b"webhook-signing-secret"
LOOPBACK = parse_allow("127.0.0.0/8")


def policy(ns: str, webhook: str | None) -> dict[str, Any]:
    alert: dict[str, Any] = {"name": "hourly-80", "percent": 80, "period": "hour", "tiers": ["free"]}
    if webhook:
        alert["webhook"] = {"url": webhook}
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "api", "namespace": ns},
            "spec": {"tiers": [{"name": "free", "requests": 100, "period": "1h"},
                               {"name": "pro", "requests": 1000, "period": "1m"}],
                     "alerts": [alert, {"name": "daily-half", "percent": 50, "period": "day"}]}}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        yield rec


@pytest.fixture
async def redis_client(redis_server: Any) -> AsyncIterator[configstore.Client]:
    async with configstore.connect(redis_server.url) as client:
        yield client


async def setup(engine: AsyncEngine, client: configstore.Client, webhook: str | None,
                used: dict[tuple[str, str], int]) -> str:
    ns = "ns-" + uuid.uuid4().hex[:8]
    await configstore.publish(client, ns, build_doc(ns, [parse_policy(policy(ns, webhook))]))
    await store.apply(engine, [window(ns, 0, NOW - 60, used)], now_s=NOW, keep_applied_s=86400)
    return ns


async def test_a_client_past_the_share_is_alerted_once_per_period(
        engine: AsyncEngine, redis_client: configstore.Client) -> None:
    ns = await setup(engine, redis_client, None, {
        ("alice", "free"): 85,  # 85 of 100 an hour: past 80 %
        ("bob", "free"): 79,  # not yet
        ("carol", "pro"): 900,  # 900 of 60,000 an hour: the hourly alert watches free only
        ("(other)", "free"): 500,  # folded clients are nobody in particular
    })
    delivered: list[Crossing] = []

    async def deliver(c: Crossing) -> None:
        delivered.append(c)

    alerts = NearLimitAlerts(engine, redis_client, [deliver])
    first = await alerts.run_once(NOW)
    assert [(c.alert.name, c.client, c.tier, c.used, c.allowance, c.period_start) for c in first] == [
        ("hourly-80", "alice", "free", 85, 100, HOUR)]
    assert delivered == first
    assert first[0].namespace == ns and "alice" in first[0].message()
    assert await alerts.run_once(NOW + 60) == []  # the same hour: not again

    # bob crosses later in the hour: his alert, alice's not again
    await store.apply(engine, [window(ns, 1, NOW + 100, {("bob", "free"): 5, ("alice", "free"): 5})],
                      now_s=NOW + 120, keep_applied_s=86400)
    assert [c.client for c in await alerts.run_once(NOW + 120)] == ["bob"]
    # The next hour starts from nothing: alice must use 80 again.
    await store.apply(engine, [window(ns, 2, HOUR + 3600 + 10, {("alice", "free"): 80})],
                      now_s=HOUR + 3700, keep_applied_s=86400)
    again = await alerts.run_once(HOUR + 3700)
    assert [(c.client, c.period_start) for c in again] == [("alice", HOUR + 3600)]


async def test_two_replicas_detecting_at_once_send_it_once(
        engine: AsyncEngine, redis_client: configstore.Client) -> None:
    await setup(engine, redis_client, None, {(f"c{i}", "free"): 90 for i in range(20)})

    async def nothing(_: Crossing) -> None:
        return None

    a = NearLimitAlerts(engine, redis_client, [nothing])
    b = NearLimitAlerts(engine, redis_client, [nothing])
    got_a, got_b = await asyncio.gather(a.run_once(NOW), b.run_once(NOW))
    clients = sorted(c.client for c in got_a + got_b)
    assert clients == sorted(f"c{i}" for i in range(20))  # each exactly once between them


async def test_the_webhook_gets_a_signed_body_after_retrying_a_failing_receiver(
        engine: AsyncEngine, redis_client: configstore.Client, receiver: Receiver) -> None:
    await setup(engine, redis_client, receiver.url, {("alice", "free"): 99})
    receiver.answers = [503, 502]  # two failures, then 200
    metrics = AnalyticsMetrics()
    sender = WebhookSender(metrics, timeout_s=5, attempts=4, secret=SECRET, allow=LOOPBACK, backoff_s=0.05)
    async with running(sender):
        await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)

        async def delivered() -> bool:
            return sent(metrics, "delivered") == 1

        await wait_for(delivered, timeout=15, what="the webhook delivered")
    assert len(receiver.got) == 3
    headers, body = receiver.got[-1]
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert headers["X-Sluice-Signature"] == expected
    doc = json.loads(body)
    assert doc["client"] == "alice" and doc["used"] == 99 and doc["allowance"] == 100
    assert doc["alert"] == "hourly-80" and doc["period"] == "hour" and doc["periodStart"] == HOUR


async def test_a_refusing_receiver_is_not_asked_again(
        engine: AsyncEngine, redis_client: configstore.Client, receiver: Receiver) -> None:
    await setup(engine, redis_client, receiver.url, {("alice", "free"): 99})
    receiver.answers = [400]
    metrics = AnalyticsMetrics()
    sender = WebhookSender(metrics, timeout_s=5, attempts=4, secret=None, allow=LOOPBACK, backoff_s=0.05)
    async with running(sender):
        await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)

        async def answered() -> bool:
            return sent(metrics, "status") == 1

        await wait_for(answered, timeout=15, what="the refusal counted")
    assert len(receiver.got) == 1
    assert "X-Sluice-Signature" not in receiver.got[0][0]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service: link-local
    "http://100.100.100.200/latest/meta-data/",  # another one, in the shared 100.64/10
    "http://[fd00:ec2::254]/latest/meta-data/",  # and one at a unique-local IPv6 address
    "http://10.0.0.1/hook",  # anything in the cluster or on a private network
    "http://192.168.1.1/hook",
    "http://[2002:a9fe:a9fe::1]/hook",  # 6to4 carrying 169.254.169.254
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 carrying it
    "http://[::ffff:10.0.0.1]/hook",  # IPv4-mapped
    "http://[fe80::1]/hook",
    "http://0.0.0.0:9/hook",
    "LOOPBACK",  # the receiver itself: loopback is refused unless allowed
    "http://localhost:{port}/hook/x",  # a name resolving to loopback
])
async def test_addresses_the_collector_must_not_call_are_refused(
        engine: AsyncEngine, redis_client: configstore.Client, receiver: Receiver, url: str) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    url = receiver.url if url == "LOOPBACK" else url.format(port=port)
    await setup(engine, redis_client, url, {("alice", "free"): 99})
    metrics = AnalyticsMetrics()
    sender = WebhookSender(metrics, timeout_s=2, attempts=2, secret=None, backoff_s=0.05)
    async with running(sender):
        await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)

        async def counted() -> bool:
            return sent(metrics, "refused") == 1

        await wait_for(counted, timeout=15, what="the webhook refused")
    assert receiver.got == []
    assert sent(metrics, "delivered") == 0


async def test_traffic_through_a_sidecar_reaches_the_webhook_through_the_collector(
        redis_server: Any, receiver: Receiver, tmp_path: Any) -> None:
    """The whole path with real processes: requests through a sidecar, its usage windows, the
    collector's rollup and detection, the signed POST. 85 anonymous requests of 100 an hour."""
    from support.analytics_process import CollectorProcess
    from support.processes import SidecarProcess, UpstreamProcess, http_get

    ns = "ns-" + uuid.uuid4().hex[:8]
    manifest = policy(ns, receiver.url)
    manifest["spec"]["identify"] = {"order": ["ip"]}
    async with configstore.connect(redis_server.url) as client:
        await configstore.publish(client, ns, build_doc(ns, [parse_policy(manifest)]))
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    up = await asyncio.to_thread(UpstreamProcess)
    sidecar = await asyncio.to_thread(SidecarProcess, up.url, "--redis", redis_server.url, "--namespace", ns,
                                      "--pod-labels", str(labels), "--usage-window-s", "0.5")
    collector = await asyncio.to_thread(
        CollectorProcess, redis_server.url, f"sqlite:///{tmp_path / 'usage.db'}",
        extra=("--alerts-interval-s", "0.5", "--alert-webhook-allow", "127.0.0.0/8",
               "--alert-webhook-secret-file", str(secret)))
    try:
        codes = [(await asyncio.to_thread(http_get, sidecar.url + "/"))[0] for _ in range(85)]
        assert codes == [200] * 85

        async def posted() -> bool:
            return bool(receiver.got)

        await wait_for(posted, timeout=30, what="the near-limit webhook")
        headers, body = receiver.got[0]
        assert headers["X-Sluice-Signature"] == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        doc = json.loads(body)
        assert (doc["namespace"], doc["policy"], doc["client"], doc["tier"]) == (ns, "api", "ip:127.0.0.1", "free")
        assert doc["used"] >= 80 and doc["allowance"] == 100
        # Five more requests: counted, but the hour's alert was sent.
        for _ in range(5):
            await asyncio.to_thread(http_get, sidecar.url + "/")
        await wait_for(lambda: asyncio.to_thread(lambda: collector.metric("sluice_analytics_requests_applied_total") >= 90),
                       timeout=30, what="the five applied")
        passes = collector.metric("sluice_analytics_near_limit_passes_total")
        await wait_for(lambda: asyncio.to_thread(
            lambda: collector.metric("sluice_analytics_near_limit_passes_total") >= passes + 2),
            timeout=30, what="two more detection passes over the five")
        assert len(receiver.got) == 1
        assert collector.metric("sluice_analytics_near_limit_alerts_total") == 1
    finally:
        collector.stop()
        sidecar.close()
        up.close()


async def test_past_the_cap_per_period_crossings_are_counted_not_sent(
        engine: AsyncEngine, redis_client: configstore.Client) -> None:
    """An alert at a low share of an IP-identified tier must not become one Event and one POST
    per client an hour: at most ``max_per_period`` clients, across replicas."""
    await setup(engine, redis_client, None, {(f"c{i:02d}", "free"): 90 for i in range(20)})

    async def nothing(_: Crossing) -> None:
        return None

    a = NearLimitAlerts(engine, redis_client, [nothing], max_per_period=5)
    assert len(await a.run_once(NOW)) == 5
    assert a.suppressed == 15
    b = NearLimitAlerts(engine, redis_client, [nothing], max_per_period=5)
    assert await b.run_once(NOW + 60) == []  # another replica: the cap is in the database


async def test_one_unreadable_document_does_not_stop_the_others(
        engine: AsyncEngine, redis_client: configstore.Client, redis_server: Any) -> None:
    good = await setup(engine, redis_client, None, {("alice", "free"): 90})
    bad = await setup(engine, redis_client, None, {("bob", "free"): 90})
    with redis_server.client() as r:  # a document this collector cannot parse (a newer schema)
        r.hset(keyschema.config_key(bad), "doc", '{"schema": 99}')

    async def nothing(_: Crossing) -> None:
        return None

    got = await NearLimitAlerts(engine, redis_client, [nothing]).run_once(NOW)
    assert [(c.namespace, c.client) for c in got] == [(good, "alice")]


async def test_a_failing_deliverer_does_not_lose_the_other_deliveries(
        engine: AsyncEngine, redis_client: configstore.Client) -> None:
    await setup(engine, redis_client, None, {("alice", "free"): 90, ("bob", "free"): 90})
    seen: list[str] = []

    async def broken(_: Crossing) -> None:
        raise RuntimeError("a bug in one deliverer")

    async def works(c: Crossing) -> None:
        seen.append(c.client)

    await NearLimitAlerts(engine, redis_client, [broken, works]).run_once(NOW)
    assert sorted(seen) == ["alice", "bob"]


async def test_the_detection_loop_survives_redis_failing(engine: AsyncEngine, tmp_path: Any) -> None:
    """A Redis that does not answer ends a pass, not the alerts for the collector's life."""
    from sluice_analytics.collector import Collector
    from sluice_analytics.settings import AnalyticsSettings
    from sluice_analytics.stream import UsageStream
    from support.redis_servers import pick_port

    await store.apply(engine, [window("shop", 0, NOW - 60, {("alice", "free"): 90})], now_s=NOW,
                      keep_applied_s=86400)
    metrics = AnalyticsMetrics()
    async with configstore.connect(f"redis://127.0.0.1:{pick_port()}", timeout=0.2) as dead:
        settings = AnalyticsSettings(redis="redis://127.0.0.1:1", alerts_interval_s=0.05)
        collector = Collector(settings, engine, UsageStream(dead, "c1", block_ms=10, claim_idle_s=60), metrics,
                              clock=lambda: NOW, near_limit=NearLimitAlerts(engine, dead, []))
        stop = asyncio.Event()
        task = asyncio.create_task(collector._alerts(stop))

        async def failed_twice() -> bool:
            return metrics.redis_errors._value.get() >= 2  # type: ignore[attr-defined]

        try:
            await wait_for(failed_twice, timeout=15, what="a second pass after a failed one")
            assert not task.done()
        finally:
            stop.set()
            await task


def test_the_event_message_shows_the_client_as_status_does() -> None:
    from sluice_core.model import Alert, AlertPeriod

    alert = Alert(name="a", percent=80, period=AlertPeriod.HOUR)
    c = Crossing("shop/api", "shop", "api", alert, "evil\x1b[31m\nclient " + "x" * 300, "free", 90, 100, HOUR)
    text = c.message()
    assert "\x1b" not in text and "\n" not in text and "x" * 100 not in text


async def test_a_black_hole_receiver_does_not_hold_up_another_hosts_alerts(
        engine: AsyncEngine, redis_client: configstore.Client, receiver: Receiver) -> None:
    """Alerts queue per host and hosts take turns: a receiver that never answers costs its own
    alerts' time, not another host's."""
    held = asyncio.Event()
    slow_calls = 0

    async def black_hole(request: web.Request) -> web.Response:
        nonlocal slow_calls
        slow_calls += 1
        await held.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", black_hole)
    async with serving(app, "127.0.0.2") as url:
        await setup(engine, redis_client, f"{url}/hook",
                    {(f"c{i}", "free"): 90 for i in range(6)})
        metrics = AnalyticsMetrics()
        sender = WebhookSender(metrics, timeout_s=30, attempts=1, secret=None, allow=LOOPBACK)
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        try:
            await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)  # six to the black hole
            other = await setup(engine, redis_client, receiver.url, {("dave", "free"): 90})
            await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)  # one to the receiver

            async def delivered() -> bool:
                return bool(receiver.got)

            await wait_for(delivered, timeout=15, what="the other host's alert")
            assert json.loads(receiver.got[0][1])["namespace"] == other
            assert slow_calls == 1  # one request at a time to the black hole
        finally:
            held.set()
            stop.set()
            await task


async def test_a_secret_ref_webhook_without_kubernetes_is_counted_not_sent(
        engine: AsyncEngine, redis_client: configstore.Client, receiver: Receiver,
        caplog: pytest.LogCaptureFixture) -> None:
    """Standalone (no Kubernetes API) a ``webhook.secretRef`` cannot be read: counted as
    ``secret`` and logged by the Secret's name; the config document carries only the ref.
    tests/k8s/test_k8s_webhook_secret.py reads a real Secret."""
    ns = "ns-" + uuid.uuid4().hex[:8]
    manifest = policy(ns, None)
    manifest["spec"]["alerts"][0]["webhook"] = {"secretRef": {"name": "chat-hook", "key": "url"}}
    await configstore.publish(redis_client, ns, build_doc(ns, [parse_policy(manifest)]))
    await store.apply(engine, [window(ns, 0, NOW - 60, {("alice", "free"): 99})], now_s=NOW, keep_applied_s=86400)
    stored = await configstore.read_raw(redis_client, ns)
    assert stored is not None
    doc = json.loads(stored[1])
    assert doc["policies"][0]["spec"]["alerts"][0]["webhook"] == {"secretRef": {"name": "chat-hook", "key": "url"}}
    metrics = AnalyticsMetrics()
    sender = WebhookSender(metrics, timeout_s=2, attempts=1, secret=None, allow=LOOPBACK)
    async with running(sender):
        assert len(await NearLimitAlerts(engine, redis_client, [sender.deliver]).run_once(NOW)) == 1

        async def counted() -> bool:
            return sent(metrics, "secret") == 1

        await wait_for(counted, timeout=15, what="the unreadable Secret counted")
    assert receiver.got == []
    assert f"Secret {ns}/chat-hook key url" in caplog.text and "--api-auth kubernetes" in caplog.text
