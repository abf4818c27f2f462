"""The admission webhook configurations the operator keeps in the cluster.

- ``sluice-policies`` (Validating): RateLimitPolicy / ClusterRateLimitPolicy CREATE and UPDATE
  go to ``/validate-policy``; ``failurePolicy: Fail`` — a policy nobody validated is not admitted.
- ``sluice-injector`` (Mutating): Pod CREATE goes to ``/mutate-pod``; ``failurePolicy: Ignore``
  and a short timeout — injection must never stop a workload from starting. Pods labelled
  ``sluice.dev/inject: "false"`` and the system namespaces are not even sent.

Both carry the CA bundle of the serving certificate (see :mod:`sluice_operator.certs`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

VALIDATING_NAME = "sluice-policies"
MUTATING_NAME = "sluice-injector"


@dataclass(frozen=True)
class Endpoint:
    """Where the API server reaches the webhooks: a Service (in-cluster) or a URL."""

    service_namespace: str | None = None
    service_name: str | None = None
    service_port: int = 443
    url: str | None = None

    def client_config(self, path: str, ca_pem: bytes) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        if self.url:
            cfg["url"] = self.url.rstrip("/") + path
        else:
            cfg["service"] = {"namespace": self.service_namespace, "name": self.service_name,
                              "port": self.service_port, "path": path}
        if ca_pem:
            cfg["caBundle"] = base64.b64encode(ca_pem).decode()
        return cfg


def validating(endpoint: Endpoint, ca_pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": VALIDATING_NAME, "labels": {"app.kubernetes.io/managed-by": "sluice-operator"}},
        "webhooks": [{
            "name": "policies.sluice.dev",
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
            "timeoutSeconds": 5, "matchPolicy": "Equivalent",
            "clientConfig": endpoint.client_config("/validate-policy", ca_pem),
            "rules": [{"apiGroups": ["sluice.dev"], "apiVersions": ["v1alpha1"],
                       "operations": ["CREATE", "UPDATE"],
                       "resources": ["ratelimitpolicies", "clusterratelimitpolicies"], "scope": "*"}],
        }],
    }


def mutating(endpoint: Endpoint, ca_pem: bytes, *, skip_namespaces: tuple[str, ...]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MUTATING_NAME, "labels": {"app.kubernetes.io/managed-by": "sluice-operator"}},
        "webhooks": [{
            "name": "inject.sluice.dev",
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Ignore",
            "timeoutSeconds": 3, "reinvocationPolicy": "Never", "matchPolicy": "Equivalent",
            "clientConfig": endpoint.client_config("/mutate-pod", ca_pem),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "objectSelector": {"matchExpressions": [
                {"key": "sluice.dev/inject", "operator": "NotIn", "values": ["false"]}]},
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": list(skip_namespaces)}]},
        }],
    }


def apply(api_client: Any, manifests: list[dict[str, Any]]) -> None:
    """Create or replace the configurations (blocking: run it in a thread)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.AdmissionregistrationV1Api(api_client)
    for m in manifests:
        name = m["metadata"]["name"]
        create: Any
        patch: Any
        if m["kind"] == "ValidatingWebhookConfiguration":
            create, patch = api.create_validating_webhook_configuration, api.patch_validating_webhook_configuration
        else:
            create, patch = api.create_mutating_webhook_configuration, api.patch_mutating_webhook_configuration
        try:
            create(m)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch(name, m)
