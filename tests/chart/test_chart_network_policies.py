"""The chart's NetworkPolicies, rendered and evaluated with NetworkPolicy's own semantics for
the pods that must and must not get through: Redis only from the operator, the collector and
injected pods; the operator and the collector only on their ports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from support.chart import container, find, render

pytestmark = pytest.mark.k8s  # helm is one of the k8s tools (hack/k8s/build.sh)

NS = "sluice-system"


@dataclass
class Pod:
    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # all the chart uses
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_admits(peer: dict[str, Any], pod: Pod, policy_ns: str) -> bool:
    """NetworkPolicyPeer: podSelector alone means the policy's namespace; namespaceSelector
    picks namespaces; both: pods so labelled in those namespaces."""
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {**pod.namespace_labels,
                                                    "kubernetes.io/metadata.name": pod.namespace})
    else:
        ns_ok = pod.namespace == policy_ns
    return ns_ok and selects(peer.get("podSelector", {}), pod.labels)


def admitted(policy: dict[str, Any], pod: Pod, port: str) -> bool:
    """Whether ``policy`` lets ``pod`` connect to its pods' port named ``port``."""
    for rule in policy["spec"].get("ingress", []):
        if not any(p["port"] == port for p in rule.get("ports", [])):
            continue
        peers = rule.get("from")
        if not peers or any(peer_admits(p, pod, policy["metadata"]["namespace"]) for p in peers):
            return True
    return False


def pod_labels(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    return dict(find(docs, kind, name)["spec"]["template"]["metadata"]["labels"])


def test_redis_takes_only_sluice() -> None:
    docs = render(namespace=NS)
    policy = find(docs, "NetworkPolicy", "sluice-redis")
    sts = find(docs, "StatefulSet", "sluice-redis")
    assert selects(policy["spec"]["podSelector"], pod_labels(docs, "StatefulSet", "sluice-redis"))
    assert container(sts)["ports"][0]["name"] == "redis"
    operator = Pod(NS, pod_labels(docs, "Deployment", "sluice-operator"))
    collector = Pod(NS, pod_labels(docs, "Deployment", "sluice-analytics"))
    injected_ns = Pod("shop", {"app": "hello"}, {"sluice.dev/inject": "true"})
    injected_pod = Pod("web", {"app": "x", "sluice.dev/inject": "true"})
    for pod in (operator, collector, injected_ns, injected_pod):
        assert admitted(policy, pod, "redis"), pod
    strangers = [Pod(NS, {"app": "other"}), Pod("shop", {"app": "hello"}),
                 Pod("web", {"app": "x", "sluice.dev/inject": "false"}),
                 Pod("other", operator.labels)]  # the operator's labels, another namespace
    for pod in strangers:
        assert not admitted(policy, pod, "redis"), pod
    # Redis connects nowhere
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == []
    # more peers by value
    docs = render("--set", "networkPolicy.redisFrom[0].podSelector.matchLabels.role=admin",
                  namespace=NS)
    policy = find(docs, "NetworkPolicy", "sluice-redis")
    assert admitted(policy, Pod(NS, {"role": "admin"}), "redis")


def test_operator_and_collector_take_only_their_ports() -> None:
    docs = render(namespace=NS)
    operator = find(docs, "NetworkPolicy", "sluice-operator")
    assert selects(operator["spec"]["podSelector"], pod_labels(docs, "Deployment", "sluice-operator"))
    anyone = Pod("elsewhere", {"app": "x"})
    ports = {p["name"] for p in container(find(docs, "Deployment", "sluice-operator"))["ports"]}
    assert {"webhook", "metrics", "healthz"} == ports
    assert admitted(operator, anyone, "webhook")  # the API server: no selector names it
    assert admitted(operator, anyone, "metrics")
    assert not admitted(operator, anyone, "healthz")  # the kubelet's probes come from the node
    collector = find(docs, "NetworkPolicy", "sluice-analytics")
    assert admitted(collector, anyone, "http")
    assert "Egress" not in operator["spec"]["policyTypes"]  # the API server again
    # narrowed to the control plane's addresses
    docs = render("--set", "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/24", namespace=NS)
    operator = find(docs, "NetworkPolicy", "sluice-operator")
    (rule,) = [r for r in operator["spec"]["ingress"] if r["ports"][0]["port"] == "webhook"]
    assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]
    # off
    assert not [d for d in render("--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]
