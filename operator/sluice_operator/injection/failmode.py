"""What an injected sidecar does before its first config (its ``--without-config``), decided per
pod at admission from the policies that select it.

A sidecar that starts while Redis is down (or before the operator wrote anything) has no
config, so it cannot know its policy's failure mode. The injector can: it sees the pod's labels
and the policies of its namespace (kopf's index) when the pod is created.

- No policy selects the pod, or every one that does fails open (``failureMode: open``, the
  default) or only shadows (``mode: shadow``): ``unlimited``. The sidecar is Ready at once and
  forwards every request unlimited (counted ``unconfigured``) until its config arrives: what
  those policies would do with Redis down anyway. A Redis outage does not stop the rollout.
- One that selects it fails closed, or cannot be read: ``refuse``. The sidecar answers 503
  and is not Ready until its config arrives: what a fail-closed policy does with Redis down.

Policies change after a pod starts; this only decides the time before its first config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sluice_core.errors import PolicyErrors
from sluice_core.model import FailureMode, Mode
from sluice_core.parse import parse_policy

UNLIMITED, REFUSE = "unlimited", "refuse"


def without_config(pod_labels: Mapping[str, str], namespace: str, policies: Iterable[Mapping[str, Any]],
                   namespace_labels: Mapping[str, str] | None = None) -> str:
    """``unlimited`` or ``refuse`` for a pod with ``pod_labels`` in ``namespace``, given the
    RateLimitPolicies of its namespace and every ClusterRateLimitPolicy (a cluster policy's
    ``namespaceSelector`` is checked against ``namespace_labels``; unknown labels: it counts)."""
    labels = dict(pod_labels)
    for body in policies:
        try:
            policy = parse_policy(body, default_namespace=namespace)
        except PolicyErrors:
            return REFUSE  # it may have been valid, and closed, when its last config was written
        if not policy.selector.matches(labels):
            continue
        if (policy.namespace_selector is not None and namespace_labels is not None
                and not policy.namespace_selector.matches(dict(namespace_labels))):
            continue
        if policy.failure_mode is FailureMode.CLOSED and policy.mode is Mode.ENFORCE:
            return REFUSE
    return UNLIMITED
