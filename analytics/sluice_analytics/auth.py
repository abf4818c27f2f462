"""Who may call the analytics API: a bearer token, checked the Kubernetes way in a cluster and
against a token file standalone. 401 when the caller is not authenticated, 403 when it may not
do what it asks (both as problem+json, by :mod:`sluice_analytics.api`).

In a cluster the token goes to a TokenReview (who is it?) and each call to a SubjectAccessReview
on the policy: ``get`` on ``ratelimitpolicies/usage`` for reads, ``update`` on
``ratelimitpolicies/buckets`` for a reset (``clusterratelimitpolicies/…`` for a cluster policy);
a read over a whole namespace asks for the namespace (no name). Answers are cached briefly
(:data:`CACHE_TTL_S`, at most :data:`CACHE_SIZE` entries, keyed by the token's SHA-256, never
the token), so a dashboard polling every few seconds costs the API server one review per TTL.

Why aiohttp straight to the API server rather than the kubernetes client: the client is
synchronous (a thread per review, a thread pool to size) and brings nothing for two POSTs of
small JSON; its configuration loader is still used, to find the server, CA and credentials
exactly as ``kubectl`` and the operator do (in-cluster, or a kubeconfig).

Nothing here logs a token or a digest of one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from sluice_core.model import CLUSTER_SCOPE

GROUP = "sluice.dev"
VERSION = "v1alpha1"
CACHE_TTL_S = 10.0
CACHE_SIZE = 4096
REVIEW_TIMEOUT_S = 5.0
log = logging.getLogger("sluice.analytics")


class Denied(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Access:
    """What one call does: ``verb`` on ``subresource`` of a policy (``policy`` None: the whole
    namespace). ``policy`` is a ref, ``namespace/name`` or ``_cluster/name``."""

    verb: str  # "get" | "update"
    subresource: str  # "usage" | "buckets"
    namespace: str
    policy: str | None = None

    def resource_attributes(self) -> dict[str, str]:
        attrs = {"group": GROUP, "verb": self.verb, "subresource": self.subresource}
        ns, _, name = (self.policy or "").rpartition("/")
        if self.policy and ns == CLUSTER_SCOPE:
            return attrs | {"resource": "clusterratelimitpolicies", "name": name}
        attrs |= {"resource": "ratelimitpolicies", "namespace": self.namespace}
        return attrs | ({"name": name} if self.policy else {})


class Authorizer(Protocol):
    async def check(self, token: str | None, access: Access) -> str:
        """The caller's name for the audit log; raises :class:`Denied`."""
        ...

    async def close(self) -> None: ...


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class TokenFile:
    """Standalone: one token, read from a file at start, allows everything (keep the file as
    secret as a Redis password). Compared in constant time."""

    def __init__(self, path: str | None) -> None:
        self._token = Path(path).read_text("utf-8").strip().encode() if path else b""
        if path and not self._token:
            raise ValueError(f"api token file {path} is empty")

    async def check(self, token: str | None, access: Access) -> str:
        if not self._token:
            raise Denied(401, "the API is off: sluice analytics runs without --api-token-file "
                              "(or --api-auth kubernetes)")
        if token is None:
            raise Denied(401, "send Authorization: Bearer <token>")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Denied(401, "the token is not valid")
        return "token-file"

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class ApiServer:
    """Where and how to reach the Kubernetes API (from :func:`load_api_server`). ``token``
    is asked at every call: in a pod the client's loader re-reads the projected token, which
    the kubelet rotates."""

    host: str
    ssl: ssl.SSLContext | bool
    token: Callable[[], str | None]


def load_api_server(kubeconfig: str | None) -> ApiServer:
    """In-cluster credentials, or ``kubeconfig``'s current context."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    ctx: ssl.SSLContext | bool = False
    if cfg.verify_ssl:
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    def token() -> str | None:
        value = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        if not value:
            return None
        return str(value) if str(value).lower().startswith("bearer ") else f"Bearer {value}"

    return ApiServer(cfg.host.rstrip("/"), ctx, token)


class KubernetesAuth:
    """TokenReview + SubjectAccessReview, with a short cache of both answers."""

    def __init__(self, server: ApiServer, *, ttl_s: float = CACHE_TTL_S, size: int = CACHE_SIZE) -> None:
        self.server = server
        self.ttl_s = ttl_s
        self.size = size
        self._users: OrderedDict[bytes, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._allowed: OrderedDict[tuple[bytes, Access], tuple[float, bool]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REVIEW_TIMEOUT_S),
                connector=aiohttp.TCPConnector(ssl=self.server.ssl))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            auth = self.server.token()
            headers = {"Authorization": auth} if auth else {}
            async with self.session().post(self.server.host + path, json=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise Denied(503, f"the Kubernetes API answered {resp.status} to a review")
                return dict(await resp.json())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Denied(503, f"the Kubernetes API could not be asked ({type(exc).__name__})") from None

    def _cached(self, cache: OrderedDict[Any, tuple[float, Any]], key: Any) -> tuple[bool, Any]:
        hit = cache.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        cache.move_to_end(key)
        return True, hit[1]

    def _store(self, cache: OrderedDict[Any, tuple[float, Any]], key: Any, value: Any) -> None:
        cache[key] = (time.monotonic() + self.ttl_s, value)
        cache.move_to_end(key)
        while len(cache) > self.size:
            cache.popitem(last=False)

    async def user(self, token: str) -> dict[str, Any]:
        digest = hashlib.sha256(token.encode()).digest()
        hit, user = self._cached(self._users, digest)
        if not hit:
            review = await self.post("/apis/authentication.k8s.io/v1/tokenreviews", {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
            status = review.get("status") or {}
            user = status.get("user") if status.get("authenticated") else None
            self._store(self._users, digest, user)
        if not user:
            raise Denied(401, "the token is not valid (TokenReview)")
        return dict(user)

    async def check(self, token: str | None, access: Access) -> str:
        if token is None:
            raise Denied(401, "send Authorization: Bearer <token> (a Kubernetes token)")
        user = await self.user(token)
        name = str(user.get("username", ""))
        key = (hashlib.sha256(token.encode()).digest(), access)
        hit, allowed = self._cached(self._allowed, key)
        if not hit:
            spec: dict[str, Any] = {"user": name, "groups": user.get("groups") or [],
                                    "resourceAttributes": access.resource_attributes()}
            if user.get("uid"):
                spec["uid"] = user["uid"]
            if user.get("extra"):
                spec["extra"] = user["extra"]
            review = await self.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
                "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})
            allowed = bool((review.get("status") or {}).get("allowed"))
            self._store(self._allowed, key, allowed)
        if not allowed:
            attrs = access.resource_attributes()
            what = f"{attrs['resource']}/{attrs['subresource']}"
            raise Denied(403, f"{name} may not {access.verb} {what}"
                              + (f" of {access.policy}" if access.policy else f" in namespace {access.namespace}"))
        return name

    async def get(self, path: str) -> dict[str, Any]:
        """A GET with the collector's own credentials; :class:`Denied` (503) when it fails."""
        try:
            auth = self.server.token()
            headers = {"Authorization": auth} if auth else {}
            async with self.session().get(self.server.host + path, headers=headers) as resp:
                if resp.status >= 300:
                    raise Denied(503, f"the Kubernetes API answered {resp.status} to a read")
                return dict(await resp.json())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Denied(503, f"the Kubernetes API could not be asked ({type(exc).__name__})") from None

    async def event(self, access: Access, reason: str, message: str, *, kind: str = "Normal") -> None:
        """A Kubernetes Event on the policy (the reset's audit record); failures are the caller's
        to log, the reset having happened. The policy is read first for its uid: ``kubectl
        describe`` lists the Events whose involvedObject names the object's uid, and a uid
        also tells this policy from one deleted and created again under the same name."""
        ns, _, name = (access.policy or "").rpartition("/")
        cluster = ns == CLUSTER_SCOPE
        event_ns = "default" if cluster else ns
        plural = "clusterratelimitpolicies" if cluster else "ratelimitpolicies"
        where = "" if cluster else f"/namespaces/{quote(ns, safe='')}"
        try:
            policy = await self.get(f"/apis/{GROUP}/{VERSION}{where}/{plural}/{quote(name, safe='')}")
            uid = {"uid": str(policy["metadata"]["uid"])}
        except (Denied, KeyError, TypeError) as exc:  # not readable (RBAC?): named by name only
            log.warning("the Event on %s names no uid: the policy could not be read (%s)", access.policy,
                        exc.detail if isinstance(exc, Denied) else "no metadata.uid")
            uid = {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{name}.", "namespace": event_ns},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}",
                                   "kind": "ClusterRateLimitPolicy" if cluster else "RateLimitPolicy",
                                   "name": name, **uid, **({} if cluster else {"namespace": ns})},
                "reason": reason, "message": message, "type": kind,
                "source": {"component": "sluice-analytics"},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        await self.post(f"/api/v1/namespaces/{event_ns}/events", body)
