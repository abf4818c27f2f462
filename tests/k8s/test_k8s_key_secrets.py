"""Key Secrets against the real kube-apiserver: each Secret is its key's grant in Redis
(``configstore.get_grant``), written or revoked when that Secret changes, and a real sidecar
process takes the change; one Secret's change touches one grant and nothing else (no document
write, no other grant).

The operator (a thread, support/operator_thread.py) serves namespaces named
``sluice-keys-*`` only."""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sluice_core import configstore, keyschema
from support import key_sidecar
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.operator_thread import Operator, running_operator
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess
from support.sluice_objects import condition, served_namespace
from support.store_calls import store_call

pytestmark = pytest.mark.k8s
NS_PREFIX = "sluice-keys"


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    return apply_crds(control_plane)


@pytest.fixture(scope="module")
def operator(k8s: ControlPlane, redis_server: Any) -> Iterator[Operator]:
    with running_operator(k8s, redis_server, f"{NS_PREFIX}-*") as op:
        yield op


@pytest.fixture
def namespace(k8s: ControlPlane, operator: Operator) -> Iterator[str]:
    with served_namespace(k8s, NS_PREFIX) as ns:
        yield ns


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def policy_yaml(name: str, ns: str, *, tiers: tuple[str, ...] = ("free", "pro")) -> str:
    return yaml.safe_dump({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "web" if name == "api" else name}},
                 "identify": {"order": ["apiKey", "ip"]},
                 "apiKeys": {"header": "X-API-Key", "required": True},
                 "tiers": [{"name": t, "requests": 1000, "period": "1h"} for t in tiers]}})


def secret_yaml(name: str, ns: str, key: str, tier: str, *, policy: str | None = "api", **more: str) -> str:
    data = {"key": key, "tier": tier, **more}
    labels = {"sluice.dev/policy": policy} if policy else {}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": name, "namespace": ns, "labels": labels},
                           "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def grant(op: Operator, ns: str, api_key: str, policy: str = "api") -> Any:
    return store_call(op.settings.redis, configstore.get_grant, f"{ns}/{policy}",
                      bytes.fromhex(keyschema.hash_api_key(api_key)))


def grants_snapshot(op: Operator, ns: str, policy: str = "api") -> dict[bytes, bytes]:
    """Every grant the policy's index lists: client id -> stored value."""
    pid = keyschema.policy_id(f"{ns}/{policy}")
    ids = sorted(op.redis.smembers(keyschema.grant_index_key(pid)))
    return {cid: op.redis.get(keyschema.grant_key(pid, cid.decode())) for cid in ids}


def new_key() -> str:
    return "sk-" + uuid.uuid4().hex


def sidecar_for(op: Operator, upstream: UpstreamProcess, ns: str, tmp_path: Path) -> SidecarProcess:
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    poll(lambda: (cfg := op.config(ns)) and cfg.policies, "the policy in Redis")
    return key_sidecar.start(upstream, op.settings.redis, ns, labels, "--pod-name", "web-0")


def test_a_key_secret_created_updated_rotated_disabled_and_deleted(
        operator: Operator, namespace: str, upstream: UpstreamProcess, tmp_path: Path) -> None:
    cp, ns = operator.cp, namespace
    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
    sidecar = sidecar_for(operator, upstream, ns, tmp_path)
    try:
        first = new_key()
        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, first, "pro"))
        stored = poll(lambda: grant(operator, ns, first), "the grant in Redis")
        assert (stored.grant.tier, stored.key_id) == ("pro", f"{ns}/k1")
        assert "api" not in operator.config(ns).grants  # not in the document
        poll(lambda: key_sidecar.status(sidecar, first) == 200, "the key works in the sidecar")

        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, first, "free"))
        poll(lambda: (g := grant(operator, ns, first)) and g.grant.tier == "free", "the tier changed")

        second = new_key()  # the key rotated: the old one refused, the new one works
        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, second, "free"))
        poll(lambda: grant(operator, ns, second), "the new key's grant")
        poll(lambda: grant(operator, ns, first) is None, "the old key revoked")
        poll(lambda: key_sidecar.status(sidecar, first) == 401, "the old key refused")
        assert key_sidecar.status(sidecar, second) == 200

        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, second, "free", disabled="true"))
        poll(lambda: grant(operator, ns, second) is None, "disabled: revoked")
        poll(lambda: key_sidecar.status(sidecar, second) == 401, "disabled: refused")

        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, second, "gold"))
        poll(lambda: "k1" in ((condition(operator.rlp(ns, "api") or {}, "Accepted") or {}).get("message") or ""),
             "the unusable Secret named in the status")
        assert grant(operator, ns, second) is None

        cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, second, "pro"))
        poll(lambda: grant(operator, ns, second), "usable again")
        poll(lambda: (operator.rlp(ns, "api") or {}).get("status", {}).get("keys") == 1, "status keys: 1")
        cp.kubectl("delete", "secret", "k1", "-n", ns)
        poll(lambda: grant(operator, ns, second) is None, "deleted: revoked")
        poll(lambda: key_sidecar.status(sidecar, second) == 401, "deleted: refused")
        poll(lambda: (operator.rlp(ns, "api") or {}).get("status", {}).get("keys") == 0, "status keys: 0")
    finally:
        sidecar.close()


def test_a_key_secret_relabelled_unlabelled_and_expiring(operator: Operator, namespace: str) -> None:
    cp, ns = operator.cp, namespace
    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns) + "---\n" + policy_yaml("other", ns))
    key = new_key()
    cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, key, "pro"))
    poll(lambda: grant(operator, ns, key), "the grant under api")

    cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, key, "pro", policy="other"))
    poll(lambda: grant(operator, ns, key, "other"), "the grant under other")
    poll(lambda: grant(operator, ns, key) is None, "gone from api")

    cp.kubectl("apply", "-f", "-", input=secret_yaml("k1", ns, key, "pro", policy=None))
    poll(lambda: grant(operator, ns, key, "other") is None, "label removed: revoked")

    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    cp.kubectl("apply", "-f", "-", input=secret_yaml("k2", ns, key, "free", expiresAt=soon.isoformat()))
    stored = poll(lambda: grant(operator, ns, key), "the expiring grant")
    assert stored.expires_ms == int(soon.timestamp() * 1000)
    poll(lambda: grant(operator, ns, key) is None, "revoked once expired", timeout=30)


def test_a_policy_change_judges_its_keys_again(operator: Operator, namespace: str) -> None:
    """A tier removed revokes its keys; put back, they are granted again; the policy created
    after its Secrets gets them; deleted, its grants go."""
    cp, ns = operator.cp, namespace
    pro, free = new_key(), new_key()
    cp.kubectl("apply", "-f", "-", input=secret_yaml("pro", ns, pro, "pro") + "---\n"
               + secret_yaml("free", ns, free, "free"))
    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
    poll(lambda: grant(operator, ns, pro) and grant(operator, ns, free), "keys of a policy created after them")

    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns, tiers=("free",)))
    poll(lambda: grant(operator, ns, pro) is None, "the pro key revoked with its tier")
    assert grant(operator, ns, free) is not None
    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
    poll(lambda: grant(operator, ns, pro), "granted again")

    cp.kubectl("delete", "rlp", "api", "-n", ns, "--timeout=30s")
    poll(lambda: not grants_snapshot(operator, ns), "every grant of the deleted policy revoked")


def test_one_secret_change_touches_one_grant(operator: Operator, namespace: str) -> None:
    cp, ns = operator.cp, namespace
    cp.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
    keys = [new_key() for _ in range(40)]
    cp.kubectl("apply", "-f", "-", input="---\n".join(secret_yaml(f"k{i}", ns, k, "free") for i, k in enumerate(keys)))
    poll(lambda: len(grants_snapshot(operator, ns)) == len(keys), "40 grants")
    poll(lambda: (operator.rlp(ns, "api") or {}).get("status", {}).get("keys") == len(keys), "status keys: 40")
    before, version = grants_snapshot(operator, ns), operator.config(ns).version

    cp.kubectl("apply", "-f", "-", input=secret_yaml("k7", ns, keys[7], "pro"))
    poll(lambda: grant(operator, ns, keys[7]).grant.tier == "pro", "k7's new tier")
    after = grants_snapshot(operator, ns)
    assert set(after) == set(before)
    assert [cid for cid in before if before[cid] != after[cid]] == [
        keyschema.client_for_api_key(bytes.fromhex(keyschema.hash_api_key(keys[7]))).encode()]
    assert operator.config(ns).version == version  # the document was not written


def test_a_restarted_operator_makes_redis_match_the_secrets(k8s: ControlPlane, redis_server: Any) -> None:
    """Secrets changed while no operator ran: once one starts, a Secret deleted meanwhile has no
    grant, one created meanwhile has its grant, and a key that never changed was never missing
    (polled in Redis throughout the start-up). 1,200 Secrets: the listing takes three pages, and
    the unchanged key is on the last (a policy judged from a partial listing would revoke it)."""
    ns = f"sluice-krestart-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    kept, dropped, added = new_key(), new_key(), new_key()
    filler = [f"sk-filler-{ns}-{i}" for i in range(1197)]
    try:
        with running_operator(k8s, redis_server, "sluice-krestart-*") as op:
            k8s.kubectl("apply", "-f", "-", input=policy_yaml("api", ns))
            for start in range(0, len(filler), 400):
                k8s.kubectl("apply", "-f", "-", input="---\n".join(
                    secret_yaml(f"k-{i:04d}", ns, filler[i], "free") for i in range(start, min(start + 400, len(filler)))))
            k8s.kubectl("apply", "-f", "-", input=secret_yaml("zz-kept", ns, kept, "pro") + "---\n"
                        + secret_yaml("dropped", ns, dropped, "pro"))
            poll(lambda: len(grants_snapshot(op, ns)) == len(filler) + 2, "every grant", timeout=120)
        k8s.kubectl("delete", "secret", "dropped", "-n", ns)
        k8s.kubectl("apply", "-f", "-", input=secret_yaml("added", ns, added, "free"))
        with running_operator(k8s, redis_server, "sluice-krestart-*") as op:
            missing = []

            def settled() -> bool:
                if grant(op, ns, kept) is None:
                    missing.append(time.monotonic())
                return grant(op, ns, dropped) is None and grant(op, ns, added) is not None

            poll(settled, "Redis as the Secrets say", interval=0.02, timeout=60)
            assert not missing, "the unchanged key was missing for a moment"
            want = {keyschema.client_for_api_key(bytes.fromhex(keyschema.hash_api_key(k))) for k in [kept, added, *filler]}
            # polled: a revoke deletes the grant, then (a command later) its index entry
            poll(lambda: {g.decode() for g in grants_snapshot(op, ns)} == want, "the index as the Secrets say", timeout=30)
            k8s.kubectl("delete", "rlp", "--all", "-n", ns, "--timeout=30s", check=False)
    finally:
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
