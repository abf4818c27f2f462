"""The transport room's one error type, and the closed set of reasons it carries."""

from __future__ import annotations

# Why a peer could not serve: also the ``reason`` label of ``sluice_store_errors_total`` (a
# closed set, so the label stays bounded) and what the ERROR log line and /readyz name.
TIMEOUT = "timeout"  # no answer in time (--redis-timeout-ms, the upstream read timeout)
UNAVAILABLE = "unavailable"  # could not connect, connection lost, cluster trouble
AUTH = "auth"  # WRONGPASS / NOAUTH / NOPERM: the credentials are wrong or lack a permission
OOM = "oom"  # Redis at maxmemory refuses writes (maxmemory-policy noeviction, or nothing to evict)
REFUSED = "refused"  # any other error reply from Redis
PROTOCOL = "protocol"  # the upstream broke HTTP (malformed, closed or reset mid-response)


class TransportError(Exception):
    """A peer (a Redis node, the upstream) could not serve a command or a request.

    The message says what happened without echoing keys or credentials; ``reason`` is one of
    the names above, so callers branch on a value instead of catching a tuple of types."""

    def __init__(self, message: str, reason: str = UNAVAILABLE) -> None:
        super().__init__(message)
        self.reason = reason

