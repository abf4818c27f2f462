"""Fixtures of the sidecar tests whose sidecars run as processes (support.key_sidecar,
support.processes): named apart from tests/conftest.py's in-process ``upstream``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import UpstreamProcess
from support.redis_servers import RedisClusterProcs, RedisServer


@pytest.fixture(scope="module")
def upstream_process() -> Iterator[UpstreamProcess]:
    """The app behind the sidecar processes, one per test module."""
    up = UpstreamProcess()
    yield up
    up.close()


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    """The pod labels file of a sidecar that the test policies select (``app: web``), with a
    label no selector names, as a Deployment's pods have."""
    f = tmp_path / "labels"
    f.write_text('app="web"\npod-template-hash="abc123"\n')
    return f


@pytest.fixture(params=["single", "cluster"])
def server(request: pytest.FixtureRequest) -> RedisServer | RedisClusterProcs:
    """A single Redis, then the 3-master Cluster (a test module may widen it: Sentinel)."""
    found: RedisServer | RedisClusterProcs = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster")
    return found
