"""`sluice services --policy P`: Services whose targetPort skips the sidecar are named."""

from __future__ import annotations

from typing import Any

from sluice_operator.bypass import check_services

POLICY = {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
          "metadata": {"name": "api", "namespace": "shop"},
          "spec": {"selector": {"matchLabels": {"app": "web"}},
                   "tiers": [{"name": "free", "requests": 5, "period": "1m"}]}}


def pod(name: str, labels: dict[str, str], injected: bool) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{"name": "app", "ports": [
        {"name": "http-app" if injected else "http", "containerPort": 8000}]}]
    if injected:
        containers.append({"name": "sluice-sidecar", "ports": [{"name": "http", "containerPort": 15080}]})
    return {"metadata": {"name": name, "labels": labels}, "spec": {"containers": containers}}


def service(name: str, selector: dict[str, str], target: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"selector": selector,
                                                  "ports": [{"name": "web", "port": 80, "targetPort": target}]}}


def test_verdicts() -> None:
    pods = [pod("web-1", {"app": "web"}, injected=True), pod("other", {"app": "db"}, injected=True)]
    services = [service("good", {"app": "web"}, "http"), service("numeric", {"app": "web"}, 8000),
                service("app-port", {"app": "web"}, "http-app"), service("db", {"app": "db"}, 5432)]
    verdicts = {f.service: f.verdict for f in check_services(POLICY, pods, services)}
    assert verdicts["good"] == "ok"
    assert verdicts["numeric"] == "bypasses the sidecar: numeric targetPort 8000"
    assert verdicts["app-port"] == "bypasses the sidecar: targetPort http-app is the app's port"
    assert "db" not in verdicts  # it does not reach the policy's pods


def test_uninjected_pods() -> None:
    verdicts = check_services(POLICY, [pod("web-1", {"app": "web"}, injected=False)],
                              [service("good", {"app": "web"}, "http")])
    assert [f.verdict for f in verdicts] == ["pods are not injected (no sidecar)"]


async def test_command_against_kmock(kmock: Any) -> None:
    import argparse
    import asyncio
    import contextlib
    import io

    import kmock as km
    from kubernetes import client
    from sluice_operator import bypass

    kmock.resources.load_bundled()
    kmock.resources["sluice.dev/v1alpha1/ratelimitpolicies"] = km.ResourceInfo(
        namespaced=True, kind="RateLimitPolicy", verbs={"list", "watch", "get", "create"})
    for path, obj in [
        ("/apis/sluice.dev/v1alpha1/namespaces/shop/ratelimitpolicies", POLICY),
        ("/api/v1/namespaces/shop/pods", {"apiVersion": "v1", "kind": "Pod",
                                          **pod("web-1", {"app": "web"}, injected=True)}),
        ("/api/v1/namespaces/shop/services", {"apiVersion": "v1", "kind": "Service",
                                              **service("numeric", {"app": "web"}, 8000)}),
    ]:
        obj["metadata"].setdefault("namespace", "shop")
        obj["metadata"].setdefault("resourceVersion", "1")
        async with kmock.post(path, json=obj) as r:
            assert r.status < 300, await r.text()
    api = client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return bypass.run(argparse.Namespace(policy="api", namespace="shop"), api_client=api)

    assert await asyncio.to_thread(run) == 1
    assert "numeric targetPort 8000" in out.getvalue()
