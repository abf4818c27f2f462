"""Cluster-mode sidecars serving API keys from Redis grants, as the key-grant tests drive
them: started once their change-notice subscription is up, asked with or without a key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sluice_core.keyschema import USAGE_STREAM_KEY

from support.polling import wait_until
from support.processes import SidecarProcess, UpstreamProcess, http_get
from support.redis_servers import RedisServer

DEADLINE = 10.0  # polling deadlines: a notice takes milliseconds; this only bounds a failure
# What is tested here is what a decision means, not Redis's speed: on a busy 2-core machine the
# default 50 ms may expire, and the failure mode would answer instead (test_key_grants_failure.py).
REDIS_TIMEOUT_MS = 2000


def start(upstream: UpstreamProcess, url: str, ns: str, labels: Path, *extra: str) -> SidecarProcess:
    """A sidecar of ``ns``, once its change-notice subscription is up: then it has emptied its
    grant cache, as it does whenever it (re)subscribes, and nothing it caches later is dropped
    but by a notice. Polling slowed to 60 s: only the notices can make a change take effect
    within the deadlines."""
    sidecar = SidecarProcess(upstream.url, "--redis", url, "--namespace", ns, "--pod-labels", str(labels),
                             "--poll-interval-s", "60", "--redis-timeout-ms", str(REDIS_TIMEOUT_MS), *extra)
    try:
        wait_until(lambda: readyz(sidecar)["config"]["notices"], DEADLINE, what="the sidecar subscribed")
    except BaseException:
        sidecar.close()
        raise
    return sidecar


def readyz(sidecar: SidecarProcess) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(http_get(sidecar.admin + "/readyz")[1])
    return result


def call(sidecar: SidecarProcess, key: str | None, path: str = "/api") -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(sidecar.url + path, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def status(sidecar: SidecarProcess, key: str | None) -> int:
    return call(sidecar, key)[0]


def all_keys(server: Iterable[RedisServer] | RedisServer) -> set[bytes]:
    """Every key in Redis, on every node of ``server`` (a Cluster, a Sentinel's master)."""
    out: set[bytes] = set()
    for node in [server] if isinstance(server, RedisServer) else list(server):
        with node.client() as r:
            out.update(r.scan_iter(count=10_000))
    out.discard(USAGE_STREAM_KEY.encode())  # the sidecars' usage windows, written on their own clock
    return out
