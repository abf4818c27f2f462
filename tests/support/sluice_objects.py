"""What the real-cluster tests read of Sluice's own objects: the webhook configurations the
operator registers, a policy's status conditions, the replicas in a ClusterKopfPeering; and a
minimal RateLimitPolicy to apply."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from sluice_operator.webhook_config import MUTATING_NAME, VALIDATING_NAME

from support.control_plane import ControlPlane

# (kind, name): cluster-wide, the validating one with failurePolicy Fail
WEBHOOK_CONFIGS = (("validatingwebhookconfiguration", VALIDATING_NAME),
                   ("mutatingwebhookconfiguration", MUTATING_NAME))

# requests a minute of each tier policy_manifest knows
TIER_REQUESTS = {"free": 10, "pro": 100}


@contextlib.contextmanager
def served_namespace(cp: ControlPlane, prefix: str) -> Iterator[str]:
    """A fresh namespace ``<prefix>-<random>`` (an operator serving ``<prefix>-*`` serves it).
    At the end its policies are deleted while the operator still runs (so their finalizers are
    removed), then the namespace goes, without waiting."""
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        cp.kubectl("delete", "rlp", "--all", "-n", ns, "--timeout=30s", check=False)
        cp.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def delete_webhook_configurations(cp: ControlPlane, *, check: bool = True) -> None:
    """Delete both configurations (if present). A Fail webhook left behind whose operator has
    stopped refuses every later policy write in the session."""
    for kind, name in WEBHOOK_CONFIGS:
        cp.kubectl("delete", kind, name, "--ignore-not-found", check=check)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == type_), None)


def programmed(cp: ControlPlane, kind: str, name: str, ns: str | None = None
               ) -> dict[str, Any] | None:
    """The object (``kind`` as kubectl spells it: "rlp", "crlp") when its Programmed condition
    is True; None otherwise, also when it cannot be read (not there yet, or gone)."""
    where = ["-n", ns] if ns else []
    res = cp.kubectl("get", kind, name, *where, "-o", "json", check=False)
    obj: dict[str, Any] = json.loads(res.stdout) if res.returncode == 0 else {}
    cond = condition(obj, "Programmed")
    return obj if cond and cond["status"] == "True" else None


def peers(cp: ControlPlane, peering: str) -> dict[str, Any]:
    """The status of the ClusterKopfPeering ``peering``: an entry (priority, lifetime, ...) per
    replica that keeps itself alive there, keyed by its identity."""
    obj = cp.kubectl_json("get", "clusterkopfpeering", peering)
    return dict(obj.get("status") or {})


def policy_manifest(name: str, ns: str, *, tiers: Sequence[str] = ("free",)) -> str:
    """A RateLimitPolicy with nothing but ``tiers`` (names from TIER_REQUESTS), a minute each."""
    return yaml.safe_dump({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"tiers": [{"name": t, "requests": TIER_REQUESTS[t], "period": "1m"}
                           for t in tiers]}})
