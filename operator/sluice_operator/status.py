"""Policy status: conditions you can trust (Accepted, Programmed, Enforced)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sluice_operator.reconcile import NamespaceOutcome, PolicyResult


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(previous: list[Mapping[str, Any]], type_: str, ok: bool, reason: str, message: str,
              generation: int) -> dict[str, Any]:
    """A metav1.Condition; ``lastTransitionTime`` only moves when the status flips."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since or _now()}


def policy_status(body: Mapping[str, Any], result: PolicyResult | None, outcome: NamespaceOutcome,
                  enforced: int | None) -> dict[str, Any]:
    generation = int(body.get("metadata", {}).get("generation") or 0)
    previous = list(body.get("status", {}).get("conditions") or [])
    conds = []
    if result is None:
        result = PolicyResult(name=str(body.get("metadata", {}).get("name")), accepted=False)
    if result.accepted:
        msg = "valid"
        if result.key_problems:
            msg += "; unusable key Secrets: " + "; ".join(f"{p.secret}: {p.reason}" for p in result.key_problems)
        conds.append(condition(previous, "Accepted", True, "Valid", msg, generation))
    else:
        serving = " (the last good version keeps serving)" if result.serving else ""
        conds.append(condition(previous, "Accepted", False, "Invalid", result.message + serving, generation))
    if outcome.redis_error:
        conds.append(condition(previous, "Programmed", False, "RedisUnavailable", outcome.redis_error, generation))
    elif outcome.keys_error:
        conds.append(condition(previous, "Programmed", False, "KeySecretsNotListed", outcome.keys_error, generation))
    elif result.serving and outcome.programmed:
        conds.append(condition(previous, "Programmed", True, "InRedis",
                               f"config version {outcome.version} in Redis", generation))
    else:
        conds.append(condition(previous, "Programmed", False, "NotProgrammed",
                               "no valid version of this policy has been written", generation))
    status: dict[str, Any] = {"conditions": conds, "tiers": result.tiers, "keys": result.keys}
    if result.scope is not None:
        status["namespaces"] = len(result.scope)
    if result.accepted:
        status["observedGeneration"] = generation
    if outcome.programmed and outcome.version:
        status["configVersion"] = outcome.version
    if enforced is not None:
        status["enforcedSidecars"] = enforced
        conds.append(condition(previous, "Enforced", enforced > 0, "SidecarsReporting" if enforced else "NoSidecars",
                               f"{enforced} sidecar(s) enforce it at config version {outcome.version}", generation))
    return status


CARRY = -1
"""``enforced`` for :func:`status_update`: keep the count the status shows (see there)."""


def status_update(body: Mapping[str, Any], result: PolicyResult | None, outcome: NamespaceOutcome,
                  enforced: int | None = CARRY) -> dict[str, Any] | None:
    """The status a reconcile calls for, or None when the status already says so: kopf would
    merge-patch any non-empty patch, and a write that changes nothing still costs the API server
    a write and every watcher an event (a thousand policies, every interval).

    ``enforced``: how many sidecars enforce the policy at the outcome's version, when counted;
    by default the count the status shows carries over while the config version stays, and a
    new version has none confirmed yet (the next resync counts them), as after a spec update."""
    old = dict(body.get("status") or {})
    if enforced == CARRY:
        kept = old.get("enforcedSidecars") if old.get("configVersion") == outcome.version else None
        enforced = kept if isinstance(kept, int) else None
    new = policy_status(body, result, outcome, enforced)
    return None if all(old.get(k) == v for k, v in new.items()) else new
