"""Operator settings: every flag of ``sluice operator`` also reads ``SLUICE_OPERATOR_<FLAG>``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorSettings:
    redis: str
    """Redis URL the sidecars read (redis://, rediss://, redis+sentinel://, redis+cluster://)."""
    resync_interval_s: float = 30.0
    """Timer: re-push config that Redis lost or that differs, refresh status (Enforced)."""
    heartbeat_stale_s: float = 30.0
    """A sidecar heartbeat older than this no longer counts as enforcing."""
    namespaces: tuple[str, ...] = ()
    """Watch only these namespaces (empty: the whole cluster)."""
