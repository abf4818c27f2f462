"""examples/ (the app the README and NOTES.txt point at): a 2-replica Deployment, a Service
with a named targetPort, a RateLimitPolicy and a key Secret that fit together; valid for
Kubernetes (kubernetes-validate), for the CRD's schema (the API server's own check in
tests/k8s/test_k8s_chart_release.py) and for Sluice's validation (the webhook's)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml
from sluice_core.parse import parse_policy
from support.examples import k8s_version
from support.paths import ROOT

EXAMPLES = ROOT / "examples"


def load() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert "namespace" not in doc["metadata"], f"{path}: applied with -n, no namespace"
                docs[doc["kind"]] = doc
    return docs


def test_the_examples_fit_together() -> None:
    docs = load()
    assert sorted(docs) == ["Deployment", "RateLimitPolicy", "Secret", "Service"]
    dep, svc, rlp, key = (docs[k] for k in ("Deployment", "Service", "RateLimitPolicy", "Secret"))
    assert dep["spec"]["replicas"] == 2
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (app,) = dep["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in app["ports"]}
    # the Service reaches the port by name: after injection that name is the sidecar's
    (port,) = svc["spec"]["ports"]
    assert isinstance(port["targetPort"], str) and port["targetPort"] in port_names
    assert "http" in port_names  # the injector's default port name (sidecar.defaultPortName)
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # the policy selects the app's pods; the key is for that policy and one of its tiers
    policy = parse_policy(rlp, source="examples/policy.yaml")
    assert all(pod_labels.get(k) == v for k, v in rlp["spec"]["selector"]["matchLabels"].items())
    assert key["metadata"]["labels"] == {"sluice.dev/policy": rlp["metadata"]["name"]}
    assert key["stringData"]["tier"] in policy.tiers
    assert len(policy.tiers) == 2


def test_the_examples_are_valid_kubernetes() -> None:
    version = k8s_version()
    docs = load()
    assert {"Deployment", "Service", "Secret"} <= set(docs)
    for kind, doc in docs.items():
        if kind != "RateLimitPolicy":
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_example_app_is_hardened() -> None:
    """The example is what people copy: non-root, read-only, no token, resources set."""
    pod = load()["Deployment"]["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert app["securityContext"]["readOnlyRootFilesystem"]
    assert app["resources"]["limits"]["memory"]
