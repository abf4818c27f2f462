"""The CRDs in crds/ against a real kube-apiserver (tests/support/control_plane.py).

What test_crds.py checks offline with mirrors (schema with jsonschema, CEL rules with Python
predicates), this file checks with the API server itself, through ``kubectl`` as a user runs it:
the CRDs become Established and discoverable (short names, category, ``kubectl explain``), the
good examples apply and show the printer columns, every bad example is refused with the message
its ``# expect-crd:`` line records (or accepted when only the webhook can refuse it), the status
subresource and ``metadata.generation`` behave, finalizers hold deletion, resourceVersions give
optimistic concurrency, and the controller-manager turns a Deployment into a ReplicaSet and Pods.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.control_plane import ControlPlane, table
from support.crds import CRD_DIR, apply_crds
from support.examples import BAD, GOOD, expectation
from support.polling import poll

pytestmark = pytest.mark.k8s

CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))


def squash(text: str) -> str:
    return " ".join(text.split())


def new_namespace(cp: ControlPlane, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", name)
    return name


def drop_namespace(cp: ControlPlane, name: str) -> None:
    cp.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


POLICY = """
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: %(name)s, namespace: %(ns)s}
spec:
  selector: {matchLabels: {app: demo}}
  tiers:
    - {name: free, requests: 10, period: 1m}
"""


def policy(name: str, ns: str) -> str:
    return POLICY % {"name": name, "ns": ns}


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the CRDs applied and Established."""
    return apply_crds(control_plane)


@pytest.fixture
def namespace(k8s: ControlPlane) -> Iterator[str]:
    ns = new_namespace(k8s, "t")
    try:
        yield ns
    finally:
        drop_namespace(k8s, ns)


# ---------------------------------------------------------------------------------------------
# the CRDs themselves


def test_crds_established_with_names(k8s: ControlPlane) -> None:
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        live = k8s.kubectl_json("get", "crd", crd["metadata"]["name"])
        assert live["status"]["acceptedNames"]["shortNames"] == crd["spec"]["names"]["shortNames"]
        assert live["status"]["acceptedNames"]["categories"] == ["sluice"]
    # kubectl resolves the short names and the category
    assert "No resources found" in k8s.kubectl("get", "rlp", "-A").stderr
    assert "No resources found" in k8s.kubectl("get", "crlp").stderr
    assert "No resources found" in k8s.kubectl("get", "sluice", "-A").stderr


def test_api_resources_category(k8s: ControlPlane) -> None:
    out = k8s.kubectl("api-resources", "--categories=sluice", "-o", "wide").stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    # NAME SHORTNAMES APIVERSION NAMESPACED KIND VERBS CATEGORIES
    found = {r[0]: r for r in rows}
    assert set(found) == {"ratelimitpolicies", "clusterratelimitpolicies"}, out
    rlp, crlp = found["ratelimitpolicies"], found["clusterratelimitpolicies"]
    assert rlp[1:5] == ["rlp", "sluice.dev/v1alpha1", "true", "RateLimitPolicy"], out
    assert crlp[1:5] == ["crlp", "sluice.dev/v1alpha1", "false", "ClusterRateLimitPolicy"], out
    assert rlp[-1] == crlp[-1] == "sluice", out


def test_explain_shows_field_descriptions(k8s: ControlPlane) -> None:
    crd = yaml.safe_load((CRD_DIR / "sluice.dev_ratelimitpolicies.yaml").read_text())
    tiers = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["tiers"]
    out = k8s.kubectl("explain", "rlp.spec.tiers").stdout
    flat = squash(out)
    assert "GROUP: sluice.dev KIND: RateLimitPolicy VERSION: v1alpha1" in flat, out
    assert squash(tiers["description"]) in flat, out
    for field, schema in tiers["items"]["properties"].items():
        assert re.search(rf"^\s+{field}\s", out, re.M), f"{field} missing:\n{out}"
        assert squash(schema["description"]) in flat, f"{field}'s description missing:\n{out}"


# ---------------------------------------------------------------------------------------------
# examples


def test_good_examples_apply_and_print_columns(k8s: ControlPlane) -> None:
    docs = [(p, yaml.safe_load(p.read_text())) for p in GOOD]
    namespaces = {d["metadata"]["namespace"] for _, d in docs if "namespace" in d["metadata"]}
    created = [ns for ns in sorted(namespaces)
               if k8s.kubectl("get", "namespace", ns, check=False).returncode != 0]
    for ns in created:
        k8s.kubectl("create", "namespace", ns)
    try:
        for path, doc in docs:
            res = k8s.kubectl("apply", "-f", str(path))
            assert "created" in res.stdout or "configured" in res.stdout, res
            kind = "rlp" if doc["kind"] == "RateLimitPolicy" else "crlp"
            where = ["-n", doc["metadata"]["namespace"]] if kind == "rlp" else []
            live = k8s.kubectl_json("get", kind, doc["metadata"]["name"], *where)
            # an example's own mode, or the schema's default when it sets none
            assert live["spec"]["mode"] == doc["spec"].get("mode", "enforce"), path.name
            assert live["metadata"]["generation"] == 1

        out = k8s.kubectl("get", "rlp", "-A").stdout
        header = out.splitlines()[0].split()
        assert header == ["NAMESPACE", "NAME", "MODE", "TIERS", "PROGRAMMED", "ENFORCED", "REQUESTS/1H",
                          "LIMITED/1H", "AGE"]
        rows = {r["NAME"]: r for r in table(out)}
        assert {d["metadata"]["name"] for _, d in docs if d["kind"] == "RateLimitPolicy"} <= set(
            rows), out
        # no operator runs, so no status columns yet
        assert rows["public-api"] == {"NAMESPACE": "shop", "NAME": "public-api",
                                      "MODE": "enforce", "TIERS": "", "PROGRAMMED": "",
                                      "ENFORCED": "", "REQUESTS/1H": "", "LIMITED/1H": "",
                                      "AGE": rows["public-api"]["AGE"]}, out
        assert rows["orders-internal"]["NAMESPACE"] == "shop"
        # partner-api (keys-required.yaml) sets no mode: MODE comes from the schema's default
        assert "mode" not in next(d for _, d in docs if d["metadata"]["name"] == "partner-api")[
            "spec"]
        assert rows["partner-api"]["MODE"] == "enforce", out

        crlp = k8s.kubectl("get", "crlp").stdout
        assert crlp.splitlines()[0].split() == ["NAME", "MODE", "TIERS", "NAMESPACES", "PROGRAMMED",
                                                "ENFORCED", "REQUESTS/1H", "LIMITED/1H", "AGE"], crlp
        assert [r["NAME"] for r in table(crlp)] == ["shared-partner-budget"]

        # Applying again changes nothing (kubectl may still print "configured": a JSON merge
        # patch replaces whole lists, and list items carry server-side defaults, e.g. skip).
        for path, doc in docs:
            kind = "rlp" if doc["kind"] == "RateLimitPolicy" else "crlp"
            where = ["-n", doc["metadata"]["namespace"]] if kind == "rlp" else []
            before = k8s.kubectl_json("get", kind, doc["metadata"]["name"], *where)["metadata"]
            k8s.kubectl("apply", "-f", str(path))
            after = k8s.kubectl_json("get", kind, doc["metadata"]["name"], *where)["metadata"]
            assert (after["resourceVersion"], after["generation"]) == (
                before["resourceVersion"], 1), path.name
            assert k8s.kubectl("diff", "-f", str(path), check=False).returncode == 0, path.name
    finally:
        for path, _ in docs:
            k8s.kubectl("delete", "-f", str(path), "--ignore-not-found", "--wait=false")
        for ns in created:
            drop_namespace(k8s, ns)


@pytest.fixture(scope="module")
def bad_namespace(k8s: ControlPlane) -> Iterator[str]:
    ns = new_namespace(k8s, "bad")
    try:
        yield ns
    finally:
        drop_namespace(k8s, ns)


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_example(k8s: ControlPlane, bad_namespace: str, path: Path) -> None:
    expected = expectation(path, "expect-crd")
    doc = yaml.safe_load(path.read_text())
    kind = "rlp" if doc["kind"] == "RateLimitPolicy" else "crlp"
    name = doc["metadata"]["name"]
    where = ["-n", bad_namespace] if kind == "rlp" else []
    res = k8s.kubectl("apply", "-f", str(path), *where, check=False)
    try:
        if expected.startswith("(webhook)"):
            # Only the validating webhook can refuse it: the CRD accepts it by design.
            assert res.returncode == 0, res.stderr
            assert "created" in res.stdout, res.stdout
            k8s.kubectl("get", kind, name, *where)
        else:
            assert res.returncode != 0, f"accepted:\n{res.stdout}"
            assert expected in res.stderr, f"expected {expected!r} in:\n{res.stderr}"
            gone = k8s.kubectl("get", kind, name, *where, check=False)
            assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stderr
    finally:
        k8s.kubectl("delete", kind, name, *where, "--ignore-not-found")


# ---------------------------------------------------------------------------------------------
# object semantics


def test_status_subresource_and_generation(k8s: ControlPlane, namespace: str) -> None:
    k8s.kubectl("apply", "-f", "-", input=policy("p1", namespace))
    before = k8s.kubectl_json("get", "rlp", "p1", "-n", namespace)
    assert before["metadata"]["generation"] == 1

    k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"tiers": 3, "enforcedSidecars": 2}}))
    after = k8s.kubectl_json("get", "rlp", "p1", "-n", namespace)
    assert after["status"]["tiers"] == 3 and after["status"]["enforcedSidecars"] == 2
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == 1  # a status change is not a new generation
    assert after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
    [row] = table(k8s.kubectl("get", "rlp", "p1", "-n", namespace).stdout)
    assert (row["MODE"], row["TIERS"], row["PROGRAMMED"], row["ENFORCED"]) == (
        "enforce", "3", "", "2"), row
    k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"conditions": [{
                    "type": "Programmed", "status": "True", "reason": "Pushed", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}}))
    [row] = table(k8s.kubectl("get", "rlp", "p1", "-n", namespace).stdout)
    assert row["PROGRAMMED"] == "True", row

    # status sent to the main resource is ignored; spec sent to /status is ignored
    k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--type=merge",
                "-p", json.dumps({"status": {"tiers": 9}}))
    k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--subresource=status", "--type=merge",
                "-p", json.dumps({"spec": {"mode": "shadow"}}))
    same = k8s.kubectl_json("get", "rlp", "p1", "-n", namespace)
    assert same["status"]["tiers"] == 3 and same["spec"]["mode"] == "enforce"
    assert same["metadata"]["generation"] == 1

    # a spec change bumps the generation and leaves the status alone
    k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--type=merge",
                "-p", json.dumps({"spec": {"mode": "shadow"}}))
    changed = k8s.kubectl_json("get", "rlp", "p1", "-n", namespace)
    assert changed["spec"]["mode"] == "shadow"
    assert changed["metadata"]["generation"] == 2
    assert changed["status"]["tiers"] == 3

    # the CEL rules guard patches too, not only creation
    bad = k8s.kubectl("patch", "rlp", "p1", "-n", namespace, "--type=merge", "-p",
                      json.dumps({"spec": {"defaultTier": "gold"}}), check=False)
    assert bad.returncode != 0
    assert "spec.defaultTier must name a declared tier in spec.tiers" in bad.stderr


def test_resource_version_conflict(k8s: ControlPlane, namespace: str) -> None:
    k8s.kubectl("apply", "-f", "-", input=policy("p2", namespace))
    stale = k8s.kubectl_json("get", "rlp", "p2", "-n", namespace)
    k8s.kubectl("patch", "rlp", "p2", "-n", namespace, "--type=merge",
                "-p", json.dumps({"spec": {"mode": "shadow"}}))
    stale["spec"]["tiers"][0]["requests"] = 20
    res = k8s.kubectl("replace", "-f", "-", input=json.dumps(stale), check=False)
    assert res.returncode != 0
    assert "the object has been modified" in res.stderr, res.stderr
    live = k8s.kubectl_json("get", "rlp", "p2", "-n", namespace)
    assert live["spec"]["tiers"][0]["requests"] == 10 and live["spec"]["mode"] == "shadow"


def test_finalizer_holds_deletion(k8s: ControlPlane, namespace: str) -> None:
    k8s.kubectl("apply", "-f", "-", input=policy("p3", namespace))
    k8s.kubectl("patch", "rlp", "p3", "-n", namespace, "--type=merge",
                "-p", json.dumps({"metadata": {"finalizers": ["sluice.dev/test"]}}))
    k8s.kubectl("delete", "rlp", "p3", "-n", namespace, "--wait=false")
    held = k8s.kubectl_json("get", "rlp", "p3", "-n", namespace)
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == ["sluice.dev/test"]

    k8s.kubectl("patch", "rlp", "p3", "-n", namespace, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))
    poll(lambda: k8s.kubectl("get", "rlp", "p3", "-n", namespace, check=False).returncode != 0,
         "p3 to be gone once its finalizer is removed")
    gone = k8s.kubectl("get", "rlp", "p3", "-n", namespace, check=False)
    assert "NotFound" in gone.stderr, gone.stderr


# ---------------------------------------------------------------------------------------------
# the controller-manager


def test_deployment_gets_replicaset_and_pending_pod(k8s: ControlPlane, namespace: str) -> None:
    # Pods are refused until the serviceaccount controller has made the namespace's 'default'.
    poll(lambda: k8s.kubectl("get", "serviceaccount", "default", "-n", namespace,
                             check=False).returncode == 0, "ServiceAccount default")
    k8s.kubectl("create", "deployment", "web", "--image=nginx", "--replicas=2", "-n", namespace)

    def replicasets() -> list[Any]:
        items: list[Any] = k8s.kubectl_json("get", "rs", "-n", namespace, "-l", "app=web")["items"]
        return items

    rs = poll(replicasets, "a ReplicaSet for deployment web")
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    def pods() -> list[Any]:
        items = k8s.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
        return items if len(items) == 2 else []

    for pod in poll(pods, "2 Pods for deployment web"):
        assert pod["status"]["phase"] == "Pending"  # no scheduler, no kubelet
        assert pod["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"]
        assert pod["spec"]["serviceAccountName"] == "default"
        assert pod["spec"]["containers"][0]["image"] == "nginx"
