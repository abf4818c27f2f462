"""The admission webhook configurations the operator keeps in the cluster.

- ``sluice-policies`` (Validating): RateLimitPolicy / ClusterRateLimitPolicy CREATE and UPDATE
  go to ``/validate-policy``; ``failurePolicy: Fail`` — a policy nobody validated is not admitted.
  Updates that change no spec (labels, annotations, finalizers, a policy being deleted) are not
  even sent (:data:`SPEC_CHANGED`): with the operator away (an uninstall, a reinstall, a
  restart) its own finalizer removals, and anyone's label edits, must not be refused.
- ``sluice-injector`` (Mutating): Pod CREATE goes to ``/mutate-pod``; ``failurePolicy: Ignore``
  and a short timeout — injection must never stop a workload from starting. Pods labelled
  ``sluice.dev/inject: "false"`` and the system namespaces are not even sent.

Both carry the CA bundle of the serving certificate (see :mod:`sluice_operator.certs`).

The Helm chart owns both objects (charts/sluice/templates/webhookconfigurations.yaml, the same
webhooks without a caBundle; a test keeps them equal to what this module builds), so
``helm uninstall`` removes them. The operator creates them when they are missing (chart-less and
local runs; ``--webhook-configurations=create``) and otherwise patches them. The chart's operator
only patches (``patch``): one that creates races ``helm install``, which creates the Deployment
before the configurations and then fails with "already exists" when the operator was quicker;
and it must not bring them back while ``helm uninstall`` removes them. Patching is a JSON merge
patch, which replaces ``webhooks`` as a whole (a strategic merge would merge ``clientConfig``
field by field, keeping a stale ``service`` next to a new ``url``) and merges
``metadata.labels`` key by key, leaving Helm's ownership label and annotations alone. Hence the operator's own label key: it must never be
``app.kubernetes.io/managed-by``, which is Helm's (``Helm``) on the chart's objects.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

VALIDATING_NAME = "sluice-policies"
MUTATING_NAME = "sluice-injector"
# The operator's mark on the configurations it keeps current (not Helm's managed-by label).
LABELS = {"sluice.dev/managed-by": "operator"}
SPEC_CHANGED = {
    "name": "spec-changed",
    "expression": "request.operation != 'UPDATE' || (!has(object.metadata.deletionTimestamp) && "
                  "(!has(object.spec) || !has(oldObject.spec) || object.spec != oldObject.spec))",
}
"""The validating webhook's matchCondition (CEL, Kubernetes 1.28+; the handler checks the same:
policy_admission): CREATE, and UPDATE that changes the spec of a policy not being deleted."""


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
        "metadata": {"name": VALIDATING_NAME, "labels": dict(LABELS)},
        "webhooks": [{
            "name": "policies.sluice.dev",
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
            "timeoutSeconds": 5, "matchPolicy": "Equivalent",
            "matchConditions": [dict(SPEC_CHANGED)],
            "clientConfig": endpoint.client_config("/validate-policy", ca_pem),
            "rules": [{"apiGroups": ["sluice.dev"], "apiVersions": ["v1alpha1"],
                       "operations": ["CREATE", "UPDATE"],
                       "resources": ["ratelimitpolicies", "clusterratelimitpolicies"], "scope": "*"}],
        }],
    }


def mutating(endpoint: Endpoint, ca_pem: bytes, *, skip_namespaces: tuple[str, ...]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MUTATING_NAME, "labels": dict(LABELS)},
        "webhooks": [{
            "name": "inject.sluice.dev",
            # NoneOnDryRun: it may write the Redis CA's ConfigMap (injection/redisca.py), never on a dry run
            "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun", "failurePolicy": "Ignore",
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


def apply(api_client: Any, manifests: list[dict[str, Any]], *, create: bool = True) -> dict[str, str]:
    """Create the configurations, or, when they exist (the chart's, or an earlier run's), merge
    patch them: ``webhooks`` replaced, labels added, every other label and annotation kept
    (blocking: run it in a thread). Returns the uids by name of those written: with
    ``create=False`` a missing configuration is left missing (and out of the result), for Helm
    to create (``--webhook-configurations=patch``)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.AdmissionregistrationV1Api(api_client)
    uids: dict[str, str] = {}
    for m in manifests:
        name = m["metadata"]["name"]
        create_one: Any
        patch: Any
        if m["kind"] == "ValidatingWebhookConfiguration":
            create_one, patch = api.create_validating_webhook_configuration, api.patch_validating_webhook_configuration
        else:
            create_one, patch = api.create_mutating_webhook_configuration, api.patch_mutating_webhook_configuration
        written = None
        if create:
            try:
                written = create_one(m)
            except ApiException as exc:
                if exc.status != 409:  # 409: it exists, patch it
                    raise
        if written is None:
            try:
                written = patch(name, m, _content_type="application/merge-patch+json")
            except ApiException as exc:
                if create or exc.status != 404:
                    raise
                continue  # patch only, and not there (yet): Helm's to create
        uids[name] = str(written.metadata.uid)
    return uids
