"""Shared fixtures: real Redis servers (single and Cluster) on loopback ports.

The process management lives in ``tests/support/redis_servers.py`` (also used by benchmarks);
this file only wires it into pytest. Tests sharing the session-wide ``redis_server`` or
``redis_cluster`` must use unique keys (uuid) or FLUSHALL themselves; tests that kill, restart
or pause Redis use ``fresh_redis``, a process of their own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.control_plane import (
    ControlPlane,
    ControlPlaneNotInstalled,
    ControlPlaneStartError,
)
from support.redis_servers import (
    RedisClusterProcs,
    RedisNotInstalled,
    RedisServer,
)
from support.sidecar_harness import Factory, RunningSidecar, Upstream, start_sidecar
from support.summary import short_message

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
        # ... and tests using the real Kubernetes control plane the ``k8s`` marker.
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.k8s)


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


# ---------------------------------------------------------------------------------------------
# A real Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager), see
# tests/support/control_plane.py. Binaries come from `make setup-k8s` (hack/k8s/build.sh).

_CONTROL_PLANE: list[ControlPlane] = []  # the running one, for failure reports
_K8S_FAILED: list[str] = []  # nodeids of failed tests that used it: keep its logs then


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager on loopback for the whole session.

    ``.kubectl(*args, input=None, check=True)``, ``.kubeconfig``, ``.server``, ``.ca_cert``,
    ``.client_cert``/``.client_key``. Shared: use a namespace (or object names) of your own and
    delete what you create. A failing test gets the tails of the component logs in its report
    and the log directory is then kept."""
    cp: ControlPlane | None = None
    try:
        cp = ControlPlane()
    except ControlPlaneNotInstalled as exc:
        message = str(exc)
    except ControlPlaneStartError as exc:
        message = f"the Kubernetes control plane did not start: {exc}"
    if cp is None:
        pytest.fail(message, pytrace=False)
    _CONTROL_PLANE.append(cp)
    try:
        yield cp
    finally:
        _CONTROL_PLANE.remove(cp)
        cp.close(keep=bool(_K8S_FAILED))
        if _K8S_FAILED:
            sys.stderr.write(f"\ncontrol plane logs kept in {cp.log_dir}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (report.failed and _CONTROL_PLANE
            and "control_plane" in getattr(item, "fixturenames", ())):
        _K8S_FAILED.append(item.nodeid)
        report.sections.append(("Kubernetes control plane logs", _CONTROL_PLANE[0].log_report()))
    crash = getattr(report.longrepr, "reprcrash", None)
    if report.failed and crash is not None:
        crash.message = short_message(crash.message)


def _not_garbage(record: logging.LogRecord) -> bool:
    """False for asyncio's reports of an aiohttp session or connector found unclosed by the
    garbage collector: they name an object an earlier test dropped, whenever the collector runs
    (twice a CI run broke a later test's log assertions that way); no test here checks them."""
    return not (record.name == "asyncio" and record.getMessage().startswith(("Unclosed client session",
                                                                           "Unclosed connector")))


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """pytest's caplog without other tests' garbage (see ``_not_garbage``)."""
    caplog.handler.addFilter(_not_garbage)
    return caplog


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The harness's app (support/sidecar_harness.py), in this process. Files whose sidecars run
    as processes, or that need a scripted upstream, define their own ``upstream``."""
    up = await Upstream().start()
    yield up
    await up.close()


@pytest.fixture
async def sidecars(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Factory]:
    """``await sidecars(policy, keys=..., redis=..., upstream=..., **settings)``: in-process
    sidecars in front of ``upstream`` (or another), stopped at the end."""
    started: list[RunningSidecar] = []

    async def make(policy: Any, *, keys: dict[str, Any] | None = None,
                   upstream: Upstream | str | None = None, **kw: Any) -> RunningSidecar:
        sc = await start_sidecar(tmp_path, policy, upstream=upstream or up, keys=keys, **kw)
        started.append(sc)
        return sc

    up = upstream
    yield make
    for sc in reversed(started):
        await sc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the test's sidecars (30 s at most per request)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
