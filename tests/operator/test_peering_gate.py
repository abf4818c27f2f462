"""Which replica the operator's own resync task writes from (kopf pauses its handlers, not our
task): kopf's rule, read from the ClusterKopfPeering's status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sluice_operator.peering import PeeringGate


def peer(priority: int, *, age_s: float = 0.0, lifetime: int = 60) -> dict[str, Any]:
    seen = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def gate(priority: int = 10) -> PeeringGate:
    return PeeringGate("sluice", "me", priority, api_client=lambda: None)


def test_active_only_while_no_live_peer_has_the_same_or_a_higher_priority() -> None:
    assert gate().decide({"me": peer(10)})
    assert gate().decide({"me": peer(10), "younger": peer(5)})
    assert not gate().decide({"me": peer(10), "older": peer(20)})
    assert not gate().decide({"me": peer(10), "twin": peer(10)})  # kopf pauses both
    assert gate().decide({"me": peer(10), "gone": peer(20, age_s=120)})  # its keep-alive expired


def test_not_active_before_this_replica_announced_itself() -> None:
    assert not gate().decide({})
    assert not gate().decide({"other": peer(1)})
