"""The mutating webhook for Pods: injects the enforcing sidecar (see
:mod:`sluice_operator.injection.plan`). It never refuses a pod: anything that prevents injection
becomes a warning and the pod is admitted unchanged."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sluice_operator.admission_review import answer, review_request
from sluice_operator.injection.failmode import REFUSE, without_config
from sluice_operator.injection.names import INJECT_LABEL
from sluice_operator.injection.plan import plan_injection
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.objects import nested

NamespaceLabels = Callable[[str], Mapping[str, str] | None]
"""Looks up a namespace's labels (None: unknown). Injected so tests need no cluster."""
PolicyLookup = Callable[[str], Iterable[Mapping[str, Any]]]
"""The policies that may select a pod of a namespace: its RateLimitPolicies and every
ClusterRateLimitPolicy (kopf's indexes, in the operator)."""


def mutate_pod(review: Any, settings: InjectionSettings,
               namespace_labels: NamespaceLabels | None = None,
               policies: PolicyLookup | None = None) -> dict[str, Any]:
    """Inject the sidecar into a pod CREATE; always allowed (problems become warnings).
    ``policies``: what decides the sidecar's behaviour before its first config
    (:mod:`~sluice_operator.injection.failmode`); without it, ``refuse``."""
    request = review_request(review)
    uid = request["uid"]
    pod = request.get("object")
    if request.get("operation") != "CREATE" or not isinstance(pod, Mapping):
        return answer(uid, True)
    namespace = _pod_namespace(request, pod)
    try:
        wanted, why_not = _wants_injection(pod, namespace, namespace_labels)
        if not wanted:
            return answer(uid, True, warnings=[why_not] if why_not else [])
        before_config = REFUSE
        if policies is not None:
            labels = nested(pod, "metadata", "labels")
            before_config = without_config(labels if isinstance(labels, Mapping) else {}, namespace,
                                           policies(namespace), _known_labels(namespace, namespace_labels))
        patch, warnings = plan_injection(pod, settings, without_config=before_config)
    except Exception as exc:  # never block a pod because of a bug or an odd manifest
        return answer(uid, True, warnings=[f"sluice: sidecar not injected: internal error: {exc!r}"])
    if not patch:
        return answer(uid, True, warnings=warnings)
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return answer(uid, True, patchType="JSONPatch", patch=encoded, warnings=warnings)


def namespace_to_look_up(review: Any) -> str | None:
    """The namespace whose labels decide injection for this review, or None when there is no
    need to read them (not a pod CREATE, or the pod's own label decides): spares the API
    server a namespace read per pod."""
    request = review.get("request") if isinstance(review, Mapping) else None
    if not isinstance(request, Mapping) or request.get("operation") != "CREATE":
        return None
    pod = request.get("object")
    if not isinstance(pod, Mapping) or _pod_choice(pod) is not None:
        return None
    return _pod_namespace(request, pod)


def _pod_choice(pod: Any) -> bool | None:
    """The pod's own ``sluice.dev/inject`` label: True, False (an opt-out wins over the
    namespace's label), or None when its namespace decides."""
    labels = nested(pod, "metadata", "labels")
    own = labels.get(INJECT_LABEL) if isinstance(labels, Mapping) else None
    return {"true": True, "false": False}.get(own) if isinstance(own, str) else None


def _known_labels(namespace: str, namespace_labels: NamespaceLabels | None) -> Mapping[str, str] | None:
    """The namespace's labels if they were read for this review (else None: unknown)."""
    if namespace_labels is None:
        return None
    try:
        return namespace_labels(namespace)
    except Exception:  # unknown: cluster policies then count whatever their namespaceSelector
        return None


def _pod_namespace(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    ns = request.get("namespace") or nested(pod, "metadata", "namespace")
    return ns if isinstance(ns, str) and ns else "default"


def _wants_injection(pod: Mapping[str, Any], namespace: str,
                     namespace_labels: NamespaceLabels | None) -> tuple[bool, str | None]:
    own = _pod_choice(pod)
    if own is not None:
        return own, None
    if namespace_labels is None:
        return False, None
    try:
        ns_labels = namespace_labels(namespace) or {}
    except Exception as exc:
        return False, (f"sluice: sidecar not injected: labels of namespace {namespace!r} "
                       f"could not be read ({exc})")
    return ns_labels.get(INJECT_LABEL) == "true", None
