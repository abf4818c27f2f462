"""Shared fixtures: real Redis servers (single and Cluster) on loopback ports.

The process management lives in ``tests/support/redis_servers.py`` (also used by benchmarks);
this file only wires it into pytest. Tests sharing the session-wide ``redis_server`` or
``redis_cluster`` must use unique keys (uuid) or FLUSHALL themselves; tests that kill, restart
or pause Redis use ``fresh_redis``, a process of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.redis_servers import (
    RedisClusterProcs,
    RedisNotInstalled,
    RedisServer,
)

T = TypeVar("T")


def _started(factory: Callable[[], T]) -> T:
    """Start servers; a missing binary fails the test with what to install (never a skip)."""
    try:
        return factory()
    except RedisNotInstalled as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests asking for the cluster directly get the ``cluster`` marker (make test-fast skips them).
    for item in items:
        if "redis_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session: use unique key prefixes; never stop it."""
    server = _started(RedisServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own: free to stop, kill, restart, pause."""
    server = _started(RedisServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    """A 3-master Redis Cluster (no replicas) for the whole session; ``.url`` is a
    ``redis+cluster://`` URL listing every node, ``.ports`` their ports."""
    cluster = _started(lambda: RedisClusterProcs(3))
    try:
        yield cluster
    finally:
        cluster.close()
