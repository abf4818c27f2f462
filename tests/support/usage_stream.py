"""Reading what sidecars wrote to the usage stream (``sluice_core.usage``), for the usage tests:
a sidecar's source from its admin port's ``/usage``, its windows from ``XRANGE`` on whichever
node holds the stream (a single Redis, or the Cluster node of its hash tag), and their rows
summed per key."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis
from sluice_core import usage
from sluice_core.keyschema import USAGE_STREAM_KEY

from support.processes import SidecarProcess, http_get
from support.redis_servers import RedisClusterProcs, RedisServer

Key = tuple[str, str, str, str, str, str]


def usage_of(sidecar: SidecarProcess) -> dict[str, Any]:
    """The sidecar's ``GET /usage``."""
    code, body = http_get(sidecar.admin + "/usage")
    assert code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def raw_entries(server: RedisServer | RedisClusterProcs) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the usage stream, from the node that holds it."""
    for node in [server] if isinstance(server, RedisServer) else list(server):
        try:
            found: list[tuple[bytes, dict[bytes, bytes]]] = node.execute("XRANGE", USAGE_STREAM_KEY, "-", "+")
        except redis.exceptions.MovedError:  # another node's slot
            continue
        if found:
            return found
    return []


def windows(server: RedisServer | RedisClusterProcs, source: str) -> list[usage.UsageWindow]:
    """The decoded windows of one sidecar process (``source``), in stream order."""
    out = []
    for _, fields in raw_entries(server):
        w = usage.decode(fields)
        if w.source == source:
            out.append(w)
    return out


def totals(ws: Iterable[usage.UsageWindow]) -> dict[Key, Counter[str]]:
    """Rows summed over windows: key -> counters (requests, tokens, latency_count, bytes...)."""
    out: dict[Key, Counter[str]] = {}
    for w in ws:
        for r in w.rows:
            c = out.setdefault(r.key, Counter())
            c.update({"requests": r.requests, "tokens": r.tokens, "latency_count": r.latency_count,
                      "histogram": sum(r.histogram.values()), "bytes_in": r.bytes_in, "bytes_out": r.bytes_out})
    return out


def requests_by_key(ws: Iterable[usage.UsageWindow]) -> dict[Key, int]:
    return {k: c["requests"] for k, c in totals(ws).items()}
