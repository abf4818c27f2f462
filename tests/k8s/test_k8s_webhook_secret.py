"""Near-limit webhook URLs from Secrets (``spec.alerts[].webhook.secretRef``) against the real API
server of the test control plane: the collector, with its chart ServiceAccount and RBAC, reads
the URL from a real Secret and POSTs to a real receiver; Redis only ever holds the reference.

The RBAC is the documented one: the chart's ClusterRole grants no Secret, so a RateLimitPolicy's
Secret stays unreadable (counted ``secret``) until the namespace grants ``get`` on that one Secret;
a ClusterRateLimitPolicy's Secret is in the collector's namespace, readable when listed in
``analytics.alertWebhookSecretNames`` and no other Secret there."""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import yaml
from sluice_analytics import store
from sluice_analytics.auth import ApiServer, KubernetesAuth
from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import NearLimitAlerts
from sluice_analytics.settings import parse_allow
from sluice_analytics.webhooks import WebhookSender
from sluice_analytics.webhooksecrets import SecretUnavailable, WebhookSecrets
from sluice_core import configstore
from sluice_core.configdoc import build_doc
from sluice_core.model import CLUSTER_SCOPE, SecretKeyRef
from sluice_core.parse import parse_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from support.chart import render
from support.control_plane import ControlPlane
from support.near_limit import Receiver, receiving, running, sent, window
from support.polling import poll, wait_for
from support.redis_servers import RedisServer

pytestmark = pytest.mark.k8s

HOUR = 1_790_002_800
NOW = HOUR + 1800


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        yield rec


def allowed(cp: ControlPlane, user: str, namespace: str, name: str) -> bool:
    review = json.dumps({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": user, "resourceAttributes": {"resource": "secrets", "verb": "get", "namespace": namespace,
                                             "name": name}}})
    return bool(json.loads(cp.kubectl("create", "-f", "-", "-o", "json", input=review).stdout)["status"].get("allowed"))


@pytest.fixture
def cluster(control_plane: ControlPlane) -> Iterator[dict[str, str]]:
    """The collector's namespace with the chart's analytics RBAC (cluster-scoped objects renamed
    so they do not clash with other files' chart installs) and ``cluster-hook`` listed in
    ``analytics.alertWebhookSecretNames``; a tenant namespace; the collector's token."""
    suffix = uuid.uuid4().hex[:6]
    own, tenant = f"sluice-{suffix}", f"tenant-{suffix}"
    docs = [d for d in render("--set", "analytics.alertWebhookSecretNames={cluster-hook}", namespace=own)
            if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
            and d["metadata"]["name"].startswith("sluice-analytics")]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    for d in docs:
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            d["metadata"]["name"] += f"-{suffix}"
        if d["kind"] == "ClusterRoleBinding":
            d["roleRef"]["name"] += f"-{suffix}"
    for ns in (own, tenant):
        control_plane.kubectl("create", "namespace", ns)
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    user = f"system:serviceaccount:{own}:sluice-analytics"
    poll(lambda: allowed(control_plane, user, own, "cluster-hook"), "the chart's webhook-secrets Role")
    token = control_plane.kubectl("-n", own, "create", "token", "sluice-analytics").stdout.strip()
    try:
        yield {"own": own, "tenant": tenant, "token": token, "user": user}
    finally:
        for ns in (own, tenant):
            control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        for d in docs:
            if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                control_plane.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], check=False)


def secret(cp: ControlPlane, namespace: str, name: str, url: str) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {"url": base64.b64encode(url.encode() + b"\n").decode()}}  # as --from-file writes it
    cp.kubectl("apply", "-f", "-", input=json.dumps(body))


def collector_auth(cp: ControlPlane, token: str) -> KubernetesAuth:
    """The collector's API access as its pod has it: the ServiceAccount's token."""
    ctx = ssl.create_default_context(cafile=str(cp.ca_cert))
    return KubernetesAuth(ApiServer(cp.server, ctx, lambda: f"Bearer {token}"))


def manifest(kind: str, name: str, namespace: str) -> dict[str, Any]:
    alert = {"name": "hourly-80", "percent": 80, "period": "hour",
             "webhook": {"secretRef": {"name": name, "key": "url"}}}
    meta = {"name": "api"} | ({"namespace": namespace} if kind == "RateLimitPolicy" else {})
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": kind, "metadata": meta,
            "spec": {"tiers": [{"name": "free", "requests": 100, "period": "1h"}], "alerts": [alert]}}


async def test_the_collector_posts_to_the_url_in_a_secret_it_was_granted(
        control_plane: ControlPlane, cluster: dict[str, str], engine: AsyncEngine,
        redis_server: RedisServer, receiver: Receiver) -> None:
    own, tenant, token, user = cluster["own"], cluster["tenant"], cluster["token"], cluster["user"]
    secret(control_plane, tenant, "chat-hook", receiver.url)
    auth = collector_auth(control_plane, token)
    metrics = AnalyticsMetrics()
    sender = WebhookSender(metrics, timeout_s=5, attempts=1, secret=None, allow=parse_allow("127.0.0.0/8"),
                           secrets=WebhookSecrets(auth, own, ttl_s=0.0))
    try:
        async with configstore.connect(redis_server.url) as redis:
            policy = parse_policy(manifest("RateLimitPolicy", "chat-hook", tenant))
            await configstore.publish(redis, tenant, build_doc(tenant, [policy]))
            stored = await configstore.read_raw(redis, tenant)
            assert stored is not None and "s3cret-token" not in stored[1] and "chat-hook" in stored[1]
            alerts = NearLimitAlerts(engine, redis, [sender.deliver])
            async with running(sender):
                # Not granted: the chart gives the collector no Secret of a tenant's namespace.
                await store.apply(engine, [window(tenant, 0, NOW - 60, {("alice", "free"): 90})],
                                  now_s=NOW, keep_applied_s=86400)
                assert len(await alerts.run_once(NOW)) == 1

                async def counted() -> bool:
                    return sent(metrics, "secret") == 1

                await wait_for(counted, timeout=15, what="the ungranted Secret counted")
                assert receiver.got == []

                # The namespace's owner grants get on that one Secret, as the README says.
                control_plane.kubectl("-n", tenant, "create", "role", "sluice-webhook-secret", "--verb=get",
                                      "--resource=secrets", "--resource-name=chat-hook")
                control_plane.kubectl("-n", tenant, "create", "rolebinding", "sluice-webhook-secret",
                                      "--role=sluice-webhook-secret", f"--serviceaccount={own}:sluice-analytics")
                poll(lambda: allowed(control_plane, user, tenant, "chat-hook"), "the tenant's grant")
                await store.apply(engine, [window(tenant, 1, NOW - 50, {("bob", "free"): 85})],
                                  now_s=NOW, keep_applied_s=86400)
                assert [c.client for c in await alerts.run_once(NOW + 1)] == ["bob"]

                async def delivered() -> bool:
                    return sent(metrics, "delivered") == 1

                await wait_for(delivered, timeout=15, what="the webhook from the Secret")
            (_, body), = receiver.got
            assert json.loads(body)["client"] == "bob"
    finally:
        await auth.close()


async def test_a_cluster_policy_reads_only_the_listed_secrets_of_the_collector_namespace(
        control_plane: ControlPlane, cluster: dict[str, str], receiver: Receiver) -> None:
    own, token = cluster["own"], cluster["token"]
    secret(control_plane, own, "cluster-hook", receiver.url)
    secret(control_plane, own, "other", receiver.url)  # same namespace, not listed
    auth = collector_auth(control_plane, token)
    secrets = WebhookSecrets(auth, own)
    try:
        ns = secrets.namespace_of(CLUSTER_SCOPE)
        assert ns == own
        assert await secrets.url(ns, SecretKeyRef("cluster-hook", "url")) == receiver.url
        with pytest.raises(SecretUnavailable, match="may not get it"):
            await secrets.url(ns, SecretKeyRef("other", "url"))
        with pytest.raises(SecretUnavailable, match="no such key"):
            await secrets.url(ns, SecretKeyRef("cluster-hook", "nope"))
    finally:
        await auth.close()
