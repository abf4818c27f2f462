"""Where kopf keeps the last handled spec of each policy: in this process's memory, not in an
annotation on the object.

kopf compares an object with the spec it last handled to tell a creation, a resumption and an
update apart, and by default writes that spec into an annotation after every handling: one
more PATCH per new or changed policy (three per new policy with the finalizer and the status:
3,000 PATCHes and as many watch events at a start-up with 1,000 fresh policies, on the API
server that the operator waits for).

The policy handlers do the same whatever kopf calls the cause (they reconcile the namespace
from the indexes), so nothing depends on the annotation surviving a restart: after one, an
object kopf has no memory of is a creation (or a resumption, if an operator of an earlier
version annotated it), and the handler reconciles its namespace as at any start-up. Updates
while running are told apart as before (the ``spec`` field filter of the update handler
compares with the spec kept here)."""

from __future__ import annotations

from typing import Any

import kopf


class MemoryDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Reads an annotation written by an earlier operator version when it has nothing of its
    own for the object; writes nothing to the object. Holds one essence (the spec, labels and
    annotations kopf compares) per live policy, forgotten when the policy is deleted."""

    def __init__(self) -> None:
        super().__init__()
        self._handled: dict[str, Any] = {}

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        """kopf's essence, without first deep-copying what it drops (the status and all the
        metadata but labels and annotations: managed fields are most of a policy's bytes).
        Built twice per event, this copy was the operator's largest CPU cost at start-up
        after kopf's index wait."""
        if extra_fields:  # a handler that watches a field outside the spec: kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        slim = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        slim["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        return super().build(body=kopf.Body(slim))  # type: ignore[arg-type]

    def fetch(self, *, body: kopf.Body) -> Any:
        kept = self._handled.get(str(body.metadata.uid))
        return kept if kept is not None else super().fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        self._handled[str(body.metadata.uid)] = essence

    def forget(self, uid: str | None) -> None:
        self._handled.pop(str(uid), None)

    def __len__(self) -> int:
        return len(self._handled)
