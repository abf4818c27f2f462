"""The sidecar's settings from its command line: the schema (``sluice_core.sidecar_settings``,
every flag also read from ``SLUICE_<FLAG>``) plus the checks across flags, standalone or
cluster mode."""

from __future__ import annotations

import argparse

from sluice_core import settingsform
from sluice_core.sidecar_settings import SidecarSettings


def from_args(args: argparse.Namespace) -> SidecarSettings:
    """Every value checked (ValueError: one line naming the flag), then the mode."""
    s = settingsform.load(SidecarSettings, args, settingsform.MUST_BE)
    if bool(s.policy_file) == bool(s.namespace):
        raise ValueError("give exactly one of --policy-file (standalone) or --namespace (cluster mode)")
    if s.namespace and not s.redis:
        raise ValueError("--namespace (cluster mode) needs --redis")
    if s.api_keys_file and not s.policy_file:
        raise ValueError("--api-keys-file is for standalone mode (--policy-file)")
    return s


def split_hostport(value: str, flag: str) -> tuple[str, int]:
    """:func:`settingsform.split_host_port`, refused in the sidecar's words."""
    try:
        return settingsform.split_host_port(value)
    except ValueError:
        raise ValueError(f"--{flag} must be HOST:PORT, got {value!r}") from None
