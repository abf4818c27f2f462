"""`sluice keys` against kmock's Kubernetes emulator: the Secrets it writes are the ones the
operator reads, the key is printed once and only its hash ever leaves the Secret."""

from __future__ import annotations

import argparse
import asyncio
import base64
from typing import Any

import kmock as kmock_lib
import pytest
from kubernetes import client
from sluice_core.keyschema import hash_api_key
from sluice_core.model import API_VERSION, CLUSTER_KIND, KIND
from sluice_core.parse import parse_policy
from sluice_operator import keys_cli
from sluice_operator.keysecrets import grants_for


def run(api: Any, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    keys_cli.add_arguments(parser)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = keys_cli.run(parser.parse_args(list(argv)), api=api)
    return code, out.getvalue()


def stored_secrets(kmock: Any) -> list[dict[str, Any]]:
    out = []
    for key in kmock.objects:
        obj = kmock.objects[key]
        if key[0].plural == "secrets" and not obj.deleted:
            out.append(obj.raw)
    return out


@pytest.fixture
async def api(kmock: Any) -> Any:
    kmock.resources.load_bundled()
    verbs = {"list", "watch", "get", "patch", "create", "delete", "update"}
    kmock.resources["sluice.dev/v1alpha1/ratelimitpolicies"] = kmock_lib.ResourceInfo(
        namespaced=True, kind=KIND, singular="ratelimitpolicy", verbs=verbs)
    kmock.resources["sluice.dev/v1alpha1/clusterratelimitpolicies"] = kmock_lib.ResourceInfo(
        namespaced=False, kind=CLUSTER_KIND, singular="clusterratelimitpolicy", verbs=verbs)
    cfg = client.Configuration(host=str(kmock.url).rstrip("/"))
    core = client.CoreV1Api(client.ApiClient(cfg))
    # The policies the keys below are for, as the API server would hold them.
    # (in a thread: kmock answers in this test's event loop)
    await asyncio.to_thread(store_policy, core, KIND, "api", ["free", "pro"], namespace="default")
    await asyncio.to_thread(store_policy, core, CLUSTER_KIND, "partners", ["partner"])
    return core


def store_policy(api: Any, kind: str, name: str, tiers: list[str], *, namespace: str | None = None) -> None:
    custom = client.CustomObjectsApi(api.api_client)
    body = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name},
            "spec": {"tiers": [{"name": t, "requests": 5, "period": "1m"} for t in tiers]}}
    if namespace is None:
        custom.create_cluster_custom_object("sluice.dev", "v1alpha1", "clusterratelimitpolicies", body)
    else:
        body["metadata"]["namespace"] = namespace
        custom.create_namespaced_custom_object("sluice.dev", "v1alpha1", namespace, "ratelimitpolicies", body)


async def test_create_list_revoke_rotate(api: Any, kmock: Any) -> None:
    policy = parse_policy({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "api"},
                           "spec": {"tiers": [{"name": "free", "requests": 1, "period": "1m"},
                                              {"name": "pro", "requests": 9, "period": "1m"}]}})
    code, out = await asyncio.to_thread(run, api, "create", "--policy", "api", "--tier", "pro",
                                        "--limit", "50/1m")
    assert code == 0
    key = out.split("store it now): ")[1].strip()
    assert key.startswith("sk_pro_")
    assert len(base64.urlsafe_b64decode(key.removeprefix("sk_pro_") + "=")) == 32  # 256 bits
    name = out.split("created secret default/")[1].split(" ")[0]

    secrets = stored_secrets(kmock)
    grants, problems, _ = grants_for(policy, secrets)
    assert not problems
    assert [g.tier for g in grants.values()] == ["pro"]
    assert next(iter(grants.values())).limit.requests == 50

    code, out = await asyncio.to_thread(run, api, "list", "--policy", "api")
    assert code == 0
    assert name in out
    assert "active" in out
    assert key not in out

    code, out = await asyncio.to_thread(run, api, "rotate", name)
    assert code == 0
    new_key = out.split("store it now): ")[1].strip()
    assert new_key != key
    secrets = stored_secrets(kmock)
    grants, _, _ = grants_for(policy, secrets)
    assert len(grants) == 1  # the old key is revoked, the new one works

    new_name = out.split("created secret default/")[1].split(";")[0]
    code, _ = await asyncio.to_thread(run, api, "revoke", new_name)
    assert code == 0
    grants, _, _ = grants_for(policy, stored_secrets(kmock))
    assert not grants  # both keys revoked now
    code, out = await asyncio.to_thread(run, api, "list")
    assert out.count("revoked") == 2
    assert new_key not in out


async def test_bad_limit_creates_nothing(api: Any, kmock: Any) -> None:
    code, _ = await asyncio.to_thread(run, api, "create", "--policy", "api", "--tier", "pro",
                                      "--limit", "lots")
    assert code == 1
    assert not stored_secrets(kmock)


async def test_cluster_policy_keys_live_in_the_cluster_keys_namespace(
        api: Any, kmock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE", raising=False)
    policy = parse_policy({"apiVersion": API_VERSION, "kind": CLUSTER_KIND, "metadata": {"name": "partners"},
                           "spec": {"tiers": [{"name": "partner", "requests": 5, "period": "1m"}]}})
    code, out = await asyncio.to_thread(run, api, "create", "--cluster-policy", "partners",
                                        "--tier", "partner")
    assert code == 0, out
    assert "created secret sluice-system/" in out and "for cluster policy partners" in out
    key = out.split("store it now): ")[1].strip()
    (secret,) = stored_secrets(kmock)
    assert secret["metadata"]["namespace"] == "sluice-system"
    assert secret["metadata"]["labels"]["sluice.dev/cluster-policy"] == "partners"
    assert "sluice.dev/policy" not in secret["metadata"]["labels"]
    grants, problems, _ = grants_for(policy, [secret])
    assert list(grants) == [hash_api_key(key)] and not problems
    name = secret["metadata"]["name"]
    code, out = await asyncio.to_thread(run, api, "rotate", name, "-n", "sluice-system")
    assert code == 0, out
    new = [s for s in stored_secrets(kmock) if s["metadata"]["name"] != name]
    assert [s["metadata"]["labels"]["sluice.dev/cluster-policy"] for s in new] == ["partners"]
    code, out = await asyncio.to_thread(run, api, "list", "-n", "sluice-system")
    assert code == 0 and out.count("cluster/partners") == 2, out


async def test_cluster_keys_follow_the_operators_cluster_keys_namespace(
        api: Any, kmock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator only reads cluster keys in its --cluster-keys-namespace; with its env var
    set, `sluice keys` writes them there too."""
    monkeypatch.setenv("SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE", "platform-keys")
    code, out = await asyncio.to_thread(run, api, "create", "--cluster-policy", "partners",
                                        "--tier", "partner")
    assert code == 0, out
    (secret,) = stored_secrets(kmock)
    assert secret["metadata"]["namespace"] == "platform-keys"


@pytest.mark.parametrize("argv,error", [
    (("--policy", "api", "--tier", "gold"),
     "error: --tier: RateLimitPolicy 'api' has no tier 'gold' (its tiers: free, pro); nothing created"),
    (("--policy", "nope", "--tier", "pro"),
     "error: --policy: no RateLimitPolicy in namespace default named 'nope'; nothing created"),
    (("--policy", "api", "--tier", "pro", "-n", "shop"),
     "error: --policy: no RateLimitPolicy in namespace shop named 'api'; nothing created"),
    (("--cluster-policy", "partners", "--tier", "pro"),
     "error: --tier: ClusterRateLimitPolicy 'partners' has no tier 'pro' (its tiers: partner); nothing created"),
    (("--cluster-policy", "nope", "--tier", "partner"),
     "error: --cluster-policy: no ClusterRateLimitPolicy named 'nope'; nothing created"),
], ids=["unknown-tier", "unknown-policy", "policy-in-another-namespace", "unknown-cluster-tier",
        "unknown-cluster-policy"])
async def test_create_refuses_a_policy_or_tier_the_api_server_does_not_have(
        api: Any, kmock: Any, argv: tuple[str, ...], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A key for a missing policy or tier would be created, printed, and then never work."""
    code, out = await asyncio.to_thread(run, api, "create", *argv)
    assert code == 1
    assert "API key" not in out
    assert capsys.readouterr().err.strip() == error
    assert not stored_secrets(kmock)


def test_a_key_limit_is_checked_like_a_policy_limit() -> None:
    """A key Secret's limit goes through the policy parser's checks: one the sidecars would refuse
    (over 1,000,000 per second) is reported on that Secret, not written into the document where
    it would make the whole namespace's config unreadable."""
    policy = parse_policy({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "api"},
                           "spec": {"tiers": [{"name": "pro", "requests": 9, "period": "1m"}]}})

    def secret(limit: str) -> dict[str, Any]:
        data = {"key": "k-" + limit, "tier": "pro", "limit": limit}
        return {"metadata": {"name": "s", "labels": {"sluice.dev/policy": "api"}},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}

    grants, problems, _ = grants_for(policy, [secret("2000000/1s")])
    assert not grants
    assert [p.reason for p in problems] == [
        "data.limit: limit.requests: 2000000 per 1s is more than 1000000 per second"]
    grants, problems, _ = grants_for(policy, [secret("x/1m")])
    assert [p.reason for p in problems] == ["data.limit: limit.requests: must be a positive integer, got 'x'"]
    grants, problems, _ = grants_for(policy, [secret("50/1m/5")])
    assert not problems and [g.limit.burst for g in grants.values() if g.limit] == [5]
