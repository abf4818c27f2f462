"""Usage of a pod under its namespace's policy and a ClusterRateLimitPolicy (cluster mode, real
Redis: single and the 3-master Cluster): each request counts once per policy that decided it,
the cluster policy by its name, a key embedded in the config document by its ``id``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aiohttp
import pytest
from sluice_core import configdoc, configstore, keyschema
from sluice_core.model import CLUSTER_SCOPE, KeyGrant
from sluice_core.parse import parse_policy
from support.polling import wait_for
from support.sidecar_harness import Upstream, start_sidecar


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster").url)


async def test_each_policy_counts_its_decisions(redis_url: str, tmp_path: Path, upstream: Upstream) -> None:
    ns, name = "u2-" + uuid.uuid4().hex[:8], "partners-" + uuid.uuid4().hex[:8]
    key = "partner-" + uuid.uuid4().hex
    local = parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                          "metadata": {"name": "web", "namespace": ns},
                          "spec": {"tiers": [{"name": "free", "requests": 100, "period": "1h"}]}})
    shared = parse_policy({"apiVersion": "sluice.dev/v1alpha1", "kind": "ClusterRateLimitPolicy",
                           "metadata": {"name": name},
                           "spec": {"identify": {"order": ["apiKey"]},
                                    "apiKeys": {"header": "X-Partner-Key", "required": True},
                                    "tiers": [{"name": "gold", "requests": 2, "period": "1h"}]}})
    grants = {shared.name: {keyschema.hash_api_key(key): KeyGrant("gold", key_id="partner-acme")}}
    async with configstore.connect(redis_url) as client:
        await configstore.publish(client, ns, configdoc.build_doc(ns, [local]))
        await configstore.publish(client, CLUSTER_SCOPE,
                                  configdoc.build_doc(CLUSTER_SCOPE, [shared], grants, {shared.name: [ns]}))
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    sc = await start_sidecar(tmp_path, None, upstream=upstream, redis=redis_url, policy_file=None,
                             namespace=ns, pod_labels=str(labels), pod_name="web-0", poll_interval_s=0.5,
                             usage_window_s=3600.0, redis_timeout_ms=2000)
    try:
        async with aiohttp.ClientSession() as http:
            async def loaded() -> bool:
                async with http.get(sc.admin_url + "/readyz") as r:
                    c = (await r.json())["config"]
                    return bool(c["policyRef"] and c["clusterPolicyRef"])

            await wait_for(loaded, what="both policies loaded")
            codes = []
            for _ in range(3):
                async with http.get(sc.url + "/orders/7", headers={"X-Partner-Key": key}) as r:
                    codes.append(r.status)
            async with http.get(sc.admin_url + "/usage") as r:
                body = json.loads(await r.read())
            async with http.get(sc.admin_url + "/metrics") as r:
                metrics = await r.text()
    finally:
        await sc.stop()
    assert codes == [200, 200, 429]
    rows = {tuple(row[:6]): row[6] for row in body["current"]["rows"]}
    # One store call for both where one node holds every key; on a Cluster two calls in order,
    # and the namespace policy's tokens given back when the shared budget refused the third
    # request: counted the same either way, under the policy that refused it only.
    assert rows == {
        (f"{ns}/web", "ip:127.0.0.1", "free", "/orders/:id", "allowed", "2xx"): 2,
        (name, "key:partner-acme", "gold", "/orders/:id", "allowed", "2xx"): 2,
        (name, "key:partner-acme", "gold", "/orders/:id", "limited", "none"): 1,
    }
    assert decisions(metrics, "web") == {"allowed": 2}
    assert decisions(metrics, f"_cluster/{name}") == {"allowed": 2, "limited": 1}
    assert key not in json.dumps(body)


def decisions(metrics: str, policy: str) -> dict[str, int]:
    """``sluice_decisions_total`` of one policy label, by decision (the Prometheus text format)."""
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("sluice_decisions_total{") and f'policy="{policy}"' in line:
            decision = line.split('decision="', 1)[1].split('"', 1)[0]
            out[decision] = out.get(decision, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out
