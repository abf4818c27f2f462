"""Sidecar settings: every flag also reads an environment variable (``SLUICE_<FLAG>``)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from sluice_sidecar.stores.memory import DEFAULT_MAX_BUCKETS


@dataclass(frozen=True)
class SidecarSettings:
    """Documented in README.md ("Sidecar flags"); the help text below is the reference."""

    upstream: str
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "0.0.0.0:9090"
    redis: str | None = None
    policy_file: str | None = None
    api_keys_file: str | None = None
    without_config: str = "refuse"
    namespace: str | None = None
    pod_labels: str | None = None
    pod_name: str | None = None
    redis_timeout_ms: int = 50
    redis_connect_timeout_ms: int = 500
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 2.0
    upstream_connect_timeout_s: float = 2.0
    upstream_timeout_s: float = 60.0
    upstream_max_connections: int = 1024
    poll_interval_s: float = 5.0
    drain_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    max_header_bytes: int = 8190
    max_request_header_bytes: int = 16384
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    client_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_client: int = 256
    max_inflight_requests: int = 256
    memory_max_buckets: int = DEFAULT_MAX_BUCKETS
    log_level: str = "info"


_HELP: dict[str, str] = {
    "upstream": "the app to protect, e.g. http://127.0.0.1:8000 (the only address ever contacted)",
    "listen": "HOST:PORT for client traffic",
    "admin_listen": "HOST:PORT for /metrics, /healthz, /readyz, /admin/config",
    "redis": "Redis URL shared by all replicas (redis://, rediss://, redis+sentinel://, redis+cluster://); "
             "without it buckets live in this process's memory",
    "policy_file": "standalone mode: a RateLimitPolicy YAML file (re-read when it changes)",
    "api_keys_file": "standalone mode: YAML of API key -> tier for the policy",
    "without_config": "before a config has ever loaded: refuse (standalone: exit at start; cluster mode: "
                      "answer 503) or unlimited (proxy every request unlimited, /readyz 503 until one loads)",
    "namespace": "cluster mode: read this namespace's compiled config from Redis",
    "pod_labels": "cluster mode: downward-API labels file used to pick the policy whose selector matches",
    "pod_name": "cluster mode: this pod's name, for the heartbeat the operator aggregates",
    "redis_timeout_ms": "give up on a Redis decision after this long (then the failure mode applies)",
    "redis_connect_timeout_ms": "give up connecting to Redis after this long",
    "breaker_threshold": "consecutive Redis failures (timeouts, lost connections, failed "
                         "authentication) that open the circuit breaker",
    "breaker_cooldown_s": "seconds after the breaker opens before it probes Redis in the background; "
                          "then every 0.1 s while Redis is unreachable or slow, once per cooldown "
                          "while it answers with an error (a wrong password), until a probe "
                          "passes and it closes",
    "upstream_connect_timeout_s": "connect timeout to the upstream (then 502)",
    "upstream_timeout_s": "read timeout between upstream bytes (then 504)",
    "upstream_max_connections": "pooled upstream connections at most",
    "poll_interval_s": "cluster mode: poll Redis for config changes this often (pub/sub is the fast path)",
    "drain_s": "after SIGTERM, report not-ready and keep serving this long before closing",
    "shutdown_timeout_s": "then wait at most this long for in-flight requests",
    "max_header_bytes": "largest request line / header field accepted (larger -> 431)",
    "max_request_header_bytes": "largest request head (request line and all header fields) accepted "
                                "(larger -> 431, connection closed)",
    "max_headers": "most header fields in one request (more -> 431, connection closed)",
    "header_timeout_s": "a new connection's first request head must be complete this long after the "
                        "connection opened, and every later head this long after its first byte; "
                        "else the connection is closed unanswered",
    "keepalive_timeout_s": "close a keep-alive client connection idle this long",
    "client_timeout_s": "a client that takes no byte of a response for this long is aborted; one "
                        "that sends no byte of its request body for this long gets 408 (connection closed)",
    "max_connections": "open client connections at most; one more is answered 503 and closed",
    "max_connections_per_client": "open connections from one client address (an IPv6 client: its /64) "
                                  "at most; one more is answered 503 and closed. Trusted proxies of "
                                  "the policy are exempt",
    "max_inflight_requests": "requests being decided or proxied at once at most; one more is "
                             "answered 503 at once (no token taken)",
    "memory_max_buckets": "in-memory store: most buckets kept (least recently written dropped past it; "
                          "about 240 bytes each: 50,000 is ~12 MiB)",
    "log_level": "debug, info, warning or error",
}


def env_name(field: str) -> str:
    return "SLUICE_" + field.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(SidecarSettings):
        flag = "--" + f.name.replace("_", "-")
        default = os.environ.get(env_name(f.name))
        kind: Any = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        help_text = f"{_HELP[f.name]} [env {env_name(f.name)}]"
        if f.name == "upstream":
            parser.add_argument(flag, default=default, required=default is None, help=help_text)
        else:
            d = kind(default) if default is not None else f.default
            parser.add_argument(flag, type=kind, default=d, help=f"{help_text} (default: {f.default})",
                                metavar="{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else None)


# Limits that protect the process: zero or less would refuse everything (or nothing). Timings:
# zero or less would make a loop spin (a breaker cooldown of 0 re-authenticates a wrong password
# back to back, a poll interval of 0 polls Redis without pause) or give up before trying.
_POSITIVE = ("max_header_bytes", "max_request_header_bytes", "max_headers", "header_timeout_s",
             "keepalive_timeout_s", "client_timeout_s", "max_connections", "max_connections_per_client",
             "max_inflight_requests", "memory_max_buckets",
             "redis_timeout_ms", "redis_connect_timeout_ms", "breaker_threshold", "breaker_cooldown_s",
             "upstream_connect_timeout_s", "upstream_timeout_s", "poll_interval_s",
             "upstream_max_connections")
# Flags with a closed set of values, checked here with the others (an env var is not checked
# by argparse's ``choices``).
CHOICES: dict[str, tuple[str, ...]] = {"without_config": ("refuse", "unlimited"),
                                       "log_level": ("debug", "info", "warning", "error")}


def from_args(args: argparse.Namespace) -> SidecarSettings:
    values = {f.name: getattr(args, f.name) for f in fields(SidecarSettings)}
    s = SidecarSettings(**values)
    for name in _POSITIVE:
        value = getattr(s, name)
        # inf passes "> 0" but means "never" (a breaker that never probes, a timeout that never
        # fires); nan fails every comparison.
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be greater than 0 and finite, got {value}")
    for name, allowed in CHOICES.items():
        if getattr(s, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be {' or '.join(allowed)}, "
                             f"got {getattr(s, name)!r}")
    if bool(s.policy_file) == bool(s.namespace):
        raise ValueError("give exactly one of --policy-file (standalone) or --namespace (cluster mode)")
    if s.namespace and not s.redis:
        raise ValueError("--namespace (cluster mode) needs --redis")
    if s.api_keys_file and not s.policy_file:
        raise ValueError("--api-keys-file is for standalone mode (--policy-file)")
    return s


def split_hostport(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--{flag} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
