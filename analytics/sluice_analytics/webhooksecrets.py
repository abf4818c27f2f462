"""The URLs of near-limit webhooks named by ``spec.alerts[].webhook.secretRef``: read from the
Kubernetes Secret when an alert is sent, never from Redis (the config document carries only the
reference, so a token in the URL's path reaches neither the sidecars nor ``get rlp``).

Where the Secret is: a RateLimitPolicy's in the policy's own namespace (a tenant names only its
own Secrets); a ClusterRateLimitPolicy's in the collector's namespace
(``--alert-webhook-secret-namespace``, by default the pod's own), where only whoever installs
Sluice can create Secrets.

Who may read it: the collector's account needs ``get`` on that one Secret. The chart does not
grant ``get secrets`` cluster-wide: the collector serves an HTTP API, and a compromise of it
would then read every Secret of the cluster (service-account tokens, TLS keys, other tenants'
credentials). A namespace that uses a ``secretRef`` grants it with a Role naming the Secret
(``resourceNames``) bound to the collector's ServiceAccount; the chart does the same in its own
namespace for the Secrets listed in ``analytics.alertWebhookSecretNames`` (cluster policies').

A URL is kept :data:`TTL_S` seconds (a pass with many crossings reads the Secret once; a
rotated Secret is used within the TTL). The value is checked as a policy's ``url`` is
(:func:`sluice_core.parse.webhook_url_problem`), then the SSRF guard of
:mod:`sluice_analytics.webhooks` applies to it like to any other URL. Nothing here logs the
value or quotes it in an error.
"""

from __future__ import annotations

import base64
import binascii
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
from sluice_core.model import CLUSTER_SCOPE, SecretKeyRef
from sluice_core.parse import webhook_url_problem

from sluice_analytics.auth import KubernetesAuth

TTL_S = 60.0
MAX_CACHED = 4096
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class SecretUnavailable(Exception):
    """The URL could not be had from the Secret; the message says why (never the value)."""


def own_namespace(setting: str, path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """``--alert-webhook-secret-namespace``, or the pod's namespace; "" outside a pod."""
    if setting:
        return setting
    try:
        return path.read_text("utf-8").strip()
    except OSError:
        return ""


class WebhookSecrets:
    def __init__(self, auth: KubernetesAuth | None, cluster_namespace: str, *, ttl_s: float = TTL_S) -> None:
        self.auth, self.cluster_namespace, self.ttl_s = auth, cluster_namespace, ttl_s
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}

    def namespace_of(self, policy_namespace: str) -> str:
        """Where the Secret of a policy of ``policy_namespace`` (``_cluster``: a cluster policy) is."""
        return self.cluster_namespace if policy_namespace == CLUSTER_SCOPE else policy_namespace

    @staticmethod
    def shown(namespace: str, ref: SecretKeyRef) -> str:
        return f"Secret {namespace}/{ref.name} key {ref.key}"

    async def url(self, namespace: str, ref: SecretKeyRef) -> str:
        """The URL in ``ref`` (a Secret of ``namespace``); :class:`SecretUnavailable` says why not."""
        if self.auth is None:
            raise SecretUnavailable("a webhook.secretRef is read from the Kubernetes API: run the collector "
                                    "with --api-auth kubernetes")
        if not namespace:
            raise SecretUnavailable("no namespace for cluster policies' webhook Secrets: set "
                                    "--alert-webhook-secret-namespace")
        key = (namespace, ref.name, ref.key)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        url = await self._read(self.auth, namespace, ref)
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = (now + self.ttl_s, url)
        return url

    async def _read(self, auth: KubernetesAuth, namespace: str, ref: SecretKeyRef) -> str:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets/{quote(ref.name, safe='')}"
        token = auth.server.token()
        try:
            async with auth.session().get(auth.server.host + path,
                                          headers={"Authorization": token} if token else {}) as resp:
                if resp.status == 403:
                    raise SecretUnavailable("the collector may not get it (403): grant its ServiceAccount get "
                                            "on this Secret (README: Near-limit alerts)")
                if resp.status == 404:
                    raise SecretUnavailable("there is no such Secret")
                if resp.status >= 300:
                    raise SecretUnavailable(f"the Kubernetes API answered {resp.status}")
                body = await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise SecretUnavailable(f"the Kubernetes API could not be asked ({type(exc).__name__})") from None
        data = (body.get("data") or {}) if isinstance(body, dict) else {}
        if not isinstance(data, dict) or ref.key not in data:
            raise SecretUnavailable("the Secret has no such key")
        try:
            url = base64.b64decode(str(data[ref.key]), validate=True).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            raise SecretUnavailable("the key's value is not UTF-8 text") from None
        problem = webhook_url_problem(url)
        if problem:  # the parser's words for a policy's url, never the value itself
            raise SecretUnavailable(f"the URL in it {problem}".replace(url, "(the URL)"))
        return url
