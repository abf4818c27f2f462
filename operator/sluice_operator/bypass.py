"""``sluice services --policy P``: which Services reach a policy's pods without the sidecar.

A Service whose ``targetPort`` is a number, or names a port of the app container, sends traffic
straight to the app: the sidecar (which takes over the app's *named* port) never sees it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluice_core.parse import parse_policy

from sluice_operator.injection.names import SIDECAR_NAME


@dataclass(frozen=True)
class Finding:
    service: str
    port: str
    verdict: str  # "ok" or why traffic bypasses the sidecar


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_services(policy_obj: Mapping[str, Any], pods: list[Mapping[str, Any]],
                   services: list[Mapping[str, Any]]) -> list[Finding]:
    policy = parse_policy({k: policy_obj.get(k) for k in ("apiVersion", "kind", "metadata", "spec")})
    selected = [p for p in pods if policy.selector.matches(p.get("metadata", {}).get("labels") or {})]
    findings: list[Finding] = []
    for svc in services:
        selector = svc.get("spec", {}).get("selector") or {}
        targets = [p for p in selected if _labels_match(selector, p.get("metadata", {}).get("labels") or {})]
        if not targets:
            continue
        name = svc["metadata"]["name"]
        for port in svc.get("spec", {}).get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            label = str(port.get("name") or port.get("port"))
            if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
                findings.append(Finding(name, label, f"bypasses the sidecar: numeric targetPort {target}"))
                continue
            owners = {c.get("name") for p in targets for c in _containers(p)
                      for cp in c.get("ports") or [] if cp.get("name") == target}
            if SIDECAR_NAME in owners:
                findings.append(Finding(name, label, "ok"))
            elif not any(c.get("name") == SIDECAR_NAME for p in targets for c in _containers(p)):
                findings.append(Finding(name, label, "pods are not injected (no sidecar)"))
            else:
                findings.append(Finding(name, label, f"bypasses the sidecar: targetPort {target} is the app's port"))
    return findings


def _containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pod's containers and init containers: a native sidecar is one of the latter."""
    spec = pod.get("spec", {})
    return [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]


HELP = "list the Services that reach a policy's pods without the sidecar"  # one line in `sluice --help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="RateLimitPolicy name")
    parser.add_argument("-n", "--namespace", default="default")


def run(args: argparse.Namespace, api_client: Any = None) -> int:
    from kubernetes import client

    if api_client is None:
        from sluice_operator.kube import default_api_client

        api_client = default_api_client()
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    ns = args.namespace
    obj: Any = custom.get_namespaced_custom_object("sluice.dev", "v1alpha1", ns, "ratelimitpolicies", args.policy)
    pods = [api_client.sanitize_for_serialization(p) for p in core.list_namespaced_pod(ns).items]
    services = [api_client.sanitize_for_serialization(s) for s in core.list_namespaced_service(ns).items]
    findings = check_services(obj, pods, services)
    if not findings:
        print(f"no Service selects the pods of policy {ns}/{args.policy}")
        return 0
    print(f"{'SERVICE':30} {'PORT':15} VERDICT")
    for f in findings:
        print(f"{f.service:30} {f.port:15} {f.verdict}")
    return 1 if any(f.verdict != "ok" for f in findings) else 0


