"""The analytics API's Kubernetes auth against the real API server of the test control plane:
ServiceAccount tokens (TokenRequest), reviewed with TokenReview, each call authorised with a
SubjectAccessReview under the chart's usage ClusterRoles: no token 401, a token without the role
403, the viewer reads (namespace-wide and one policy) but may not reset, the admin resets and the
reset leaves an Event on the policy."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from sluice_analytics.api import ApiContext
from sluice_analytics.auth import KubernetesAuth, load_api_server
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from support.analytics_api import api_client
from support.chart import render
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.polling import poll
from support.redis_servers import RedisServer
from support.sidecar_harness import policy_doc

pytestmark = pytest.mark.k8s


@pytest.fixture
def cluster(control_plane: ControlPlane) -> Any:
    """A namespace with three ServiceAccounts: ``nobody``, ``viewer`` and ``admin`` bound (in
    the namespace) to the chart's usage ClusterRoles; their tokens."""
    ns = f"usage-{uuid.uuid4().hex[:6]}"
    release = "sluice"  # the chart's roles as rendered (cluster-wide names: applied, not deleted)
    roles = [d for d in render() if d["kind"] == "ClusterRole"
             and d["metadata"]["name"].endswith(("-usage-viewer", "-usage-admin"))]
    assert len(roles) == 2
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(roles))
    control_plane.kubectl("create", "namespace", ns)
    tokens = {}
    for who in ("nobody", "viewer", "admin"):
        control_plane.kubectl("-n", ns, "create", "serviceaccount", who)
        if who != "nobody":
            control_plane.kubectl("-n", ns, "create", "rolebinding", who, f"--clusterrole={release}-usage-{who}",
                                  f"--serviceaccount={ns}:{who}")
        tokens[who] = control_plane.kubectl("-n", ns, "create", "token", who).stdout.strip()
    for who, verb, sub in (("viewer", "get", "usage"), ("admin", "update", "buckets")):
        # RBAC is read by the API server from its informer: wait until the bindings count.
        review = json.dumps({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": f"system:serviceaccount:{ns}:{who}", "resourceAttributes": {
                "group": "sluice.dev", "resource": "ratelimitpolicies", "subresource": sub,
                "verb": verb, "namespace": ns}}})
        poll(lambda r=review: json.loads(control_plane.kubectl("create", "-f", "-", "-o", "json", input=r).stdout)
             ["status"].get("allowed"), f"the {who} binding")
    try:
        yield ns, tokens
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
async def api(cluster: Any, control_plane: ControlPlane, engine: AsyncEngine,
              redis_server: RedisServer) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    ns, _ = cluster
    doc = policy_doc("api", ns, tiers=[{"name": "free", "requests": 5, "period": "1h"}])
    apply_crds(control_plane)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(doc))  # what the reset's Event names
    auth = KubernetesAuth(load_api_server(str(control_plane.kubeconfig)))
    async with configstore.connect(redis_server.url) as redis:
        await configstore.publish(redis, ns, configdoc.build_doc(ns, [parse_policy(doc)]))
        client = await api_client(ApiContext(engine, auth, redis))
        yield client
        await client.close()
    await auth.close()


async def status(api: TestClient[web.Request, web.Application], method: str, path: str,
                 token: str | None, **query: str) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await api.request(method, path, params=query, headers=headers)
    if resp.status in (401, 403):
        assert resp.content_type == "application/problem+json"
        assert not token or token not in await resp.text()
    return resp.status


async def test_kubernetes_auth(api: TestClient[web.Request, web.Application], cluster: Any,
                               control_plane: ControlPlane) -> None:
    ns, tokens = cluster
    bucket = {"namespace": ns, "policy": "api", "client": "ip:10.1.2.3"}
    assert await status(api, "GET", "/v1/top", None, namespace=ns) == 401
    assert await status(api, "GET", "/v1/top", "not-a-token", namespace=ns) == 401
    assert await status(api, "GET", "/v1/top", tokens["nobody"], namespace=ns) == 403
    assert await status(api, "GET", "/v1/top", tokens["viewer"], namespace=ns) == 200
    assert await status(api, "GET", "/v1/top", tokens["viewer"], namespace=ns, policy="api") == 200
    assert await status(api, "GET", "/v1/top", tokens["viewer"], namespace="default") == 403  # not bound there
    assert await status(api, "GET", "/v1/buckets", tokens["viewer"], **bucket) == 200
    assert await status(api, "DELETE", "/v1/buckets", tokens["viewer"], **bucket) == 403
    assert await status(api, "DELETE", "/v1/buckets", tokens["nobody"], **bucket) == 403
    assert await status(api, "DELETE", "/v1/buckets", tokens["admin"], **bucket) == 200

    # The Event is written before the reset answers: there to read at once.
    items = control_plane.kubectl_json("-n", ns, "get", "events", "--field-selector", "involvedObject.name=api")["items"]
    (found,) = [e for e in items if e["reason"] == "BucketReset"]
    assert found["involvedObject"]["kind"] == "RateLimitPolicy"
    # Named by uid too: `kubectl describe` lists an object's Events by its uid.
    policy = control_plane.kubectl_json("-n", ns, "get", "rlp", "api")
    assert found["involvedObject"]["uid"] == policy["metadata"]["uid"]
    described = control_plane.kubectl("-n", ns, "describe", "rlp", "api").stdout
    assert "BucketReset" in described
    assert f"system:serviceaccount:{ns}:admin" in found["message"]
    assert "10.1.2.3" not in found["message"]
