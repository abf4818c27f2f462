"""The validating webhook for ``RateLimitPolicy`` and ``ClusterRateLimitPolicy``.

It runs :func:`sluice_core.parse.parse_policy` and :func:`sluice_core.lint.policy_warnings`,
the same code as ``sluice check``: errors refuse the object (422) naming every field and
reason; valid-but-suspicious configs are admitted with warnings (``kubectl apply`` prints them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluice_core.errors import PolicyErrors
from sluice_core.lint import policy_warnings
from sluice_core.model import CLUSTER_KIND, KIND
from sluice_core.parse import parse_policy

from sluice_operator.admission_review import answer, review_request
from sluice_operator.objects import nested


def review_policy(review: Any) -> dict[str, Any]:
    """Validate a RateLimitPolicy / ClusterRateLimitPolicy CREATE or UPDATE."""
    request = review_request(review)
    uid = request["uid"]
    obj = request.get("object")
    kind = nested(request, "kind", "kind")
    if _nothing_to_validate(request):
        return answer(uid, True)
    if kind not in (KIND, CLUSTER_KIND):
        return answer(uid, True, warnings=[
            f"sluice policy webhook received a {kind or 'request without a kind'}; not validated"])
    if _unchanged_spec_or_deleting(request, obj):
        return answer(uid, True)
    name = request.get("name") or ""
    try:
        policy = parse_policy(obj, default_namespace=request.get("namespace") or "default")
    except PolicyErrors as exc:
        return answer(uid, False, status=_refusal(exc, kind, name))
    spec = nested(obj, "spec")
    return answer(uid, True, warnings=policy_warnings(policy, spec if isinstance(spec, Mapping) else {}))


def _nothing_to_validate(request: Mapping[str, Any]) -> bool:
    """DELETE, CONNECT, status updates."""
    return request.get("operation") not in ("CREATE", "UPDATE") or bool(request.get("subResource"))


def _unchanged_spec_or_deleting(request: Mapping[str, Any], obj: Any) -> bool:
    if request.get("operation") != "UPDATE" or not isinstance(obj, Mapping):
        return False
    if nested(obj, "metadata", "deletionTimestamp"):
        return True  # never block finalizer removal of a policy being deleted
    old = request.get("oldObject")
    # a metadata-only change (labels, finalizers): the spec was validated when it was written
    return isinstance(old, Mapping) and old.get("spec") == obj.get("spec")


def _refusal(exc: PolicyErrors, kind: str, name: str) -> dict[str, Any]:
    """The 422 status naming every field and reason, as the API server's own validation does."""
    lines = [f"{e.path or '(object)'}: {e.reason}" for e in exc.errors]
    what = f"{kind} {name!r}" if name else kind
    causes = [{"field": e.path, "message": e.reason, "reason": "FieldValueInvalid"}
              for e in exc.errors]
    return {"status": "Failure", "code": 422, "reason": "Invalid",
            "message": f"{what} is invalid: " + "; ".join(lines),
            "details": {"name": name, "group": "sluice.dev", "kind": kind, "causes": causes}}
