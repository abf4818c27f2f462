"""The e2e tests' one-node cluster (tests/support/node.py, brought up by hack/node/up.sh).

``node_session`` (session) owns it: brought up by the first test that asks, torn down at the end
of the session (a teardown that leaves anything behind is an error of the session). ``node``
gives the running :class:`Node`; a bring-up that fails (or cannot run here: not root, a missing
package or binary) fails the test with the reason and the components' log tails, never a skip.
A failing e2e test gets the node's log tails in its report, and one using the Sluice install
(``release``, tests/e2e/test_e2e_node_sluice.py) the state and logs of Sluice's and the app's Pods.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.e2e_sluice import FAILURE_DETAILS, Release
from support.node import Node, NodeSession, node_up

_SESSION: list[NodeSession] = []
_FAILED: list[str] = []


@pytest.fixture(scope="session")
def node_session() -> Iterator[NodeSession]:
    session = NodeSession()
    _SESSION.append(session)
    try:
        yield session
    finally:
        _SESSION.remove(session)
        session.down(keep_logs=bool(_FAILED))


@pytest.fixture
def node(node_session: NodeSession) -> Node:
    return node_up(node_session)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and _SESSION and _SESSION[0].node is not None:
        _FAILED.append(item.nodeid)
        # A module fixture's failure is re-raised for each test of the module: the node's logs
        # once, with its first report (then with each test that fails on its own).
        if len(_FAILED) == 1 or report.when == "call":
            report.sections.append(("one-node cluster logs", _SESSION[0].node.log_report()))
        release = getattr(item, "funcargs", {}).get("release")
        if isinstance(release, Release) and release.installed:
            # The state, events and logs of Sluice's Pods and the app's (kubectl describe/logs).
            report.sections.append(("Sluice's Pods", release.diagnose()))
        while FAILURE_DETAILS:  # an install that failed: its diagnosis, once
            report.sections.append(("Sluice's Pods", FAILURE_DETAILS.pop(0)))
