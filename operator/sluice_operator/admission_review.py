"""The ``admission.k8s.io/v1`` AdmissionReview envelope: the request a webhook receives and the
review it answers with (``apiVersion``, ``kind``, ``response``), ready to serialise as its HTTP
answer. A body that is not an AdmissionReview raises :class:`ReviewError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ADMISSION_API_VERSION = "admission.k8s.io/v1"
_WARNING_MAX = 256  # the API server truncates longer warnings


class ReviewError(ValueError):
    """The request body is not an AdmissionReview the webhook can answer (HTTP 400)."""


def review_request(review: Any) -> Mapping[str, Any]:
    """The review's ``request``, checked to carry a uid."""
    if not isinstance(review, Mapping):
        raise ReviewError("body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != ADMISSION_API_VERSION:
        raise ReviewError(f"body must be an AdmissionReview of {ADMISSION_API_VERSION}")
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ReviewError("AdmissionReview.request with a uid is required")
    return request


def answer(uid: str, allowed: bool, **extra: Any) -> dict[str, Any]:
    """The AdmissionReview answering request ``uid``; empty ``extra`` fields are left out,
    warnings are shortened to what the API server keeps."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    response.update({k: v for k, v in extra.items() if v})
    if "warnings" in response:
        response["warnings"] = [w if len(w) <= _WARNING_MAX else w[: _WARNING_MAX - 1] + "…"
                                for w in response["warnings"]]
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def error_review(uid: str, message: str) -> dict[str, Any]:
    """Allowed with a warning: for the mutating webhook, where nothing may block a pod."""
    return answer(uid, True, warnings=[message])
