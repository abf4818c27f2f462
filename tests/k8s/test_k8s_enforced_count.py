"""``Enforced`` follows what sidecars do (#12, defect 5), with the operator against the real API
server, a real Redis and sidecar processes in cluster mode:

- after a policy edit the sidecars reload within milliseconds and report it at once; the
  operator counts them again a second later, not at its next sweep (here five minutes away,
  so only that recount can make the status follow);
- a sidecar that stops withdraws its heartbeat: a pod that is gone is not counted until its
  beat goes stale.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sluice_core import keyschema
from support.control_plane import ControlPlane
from support.crds import apply_crds
from support.operator_thread import running_operator
from support.polling import poll
from support.processes import SidecarProcess, UpstreamProcess
from support.sluice_objects import condition, policy_manifest

pytestmark = pytest.mark.k8s
PREFIX = "sluice-count"


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane) -> ControlPlane:
    return apply_crds(control_plane)


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.close()


def enforced(op: Any, ns: str) -> tuple[int | None, int | None, str | None]:
    """(enforcedSidecars, configVersion, the Enforced condition's status) of policy ``api``."""
    obj = op.rlp(ns, "api") or {}
    status = obj.get("status") or {}
    cond = condition(obj, "Enforced")
    return status.get("enforcedSidecars"), status.get("configVersion"), cond["status"] if cond else None


def members_of(redis_server: Any, ns: str, pod: str) -> list[str]:
    found = redis_server.client().zrange(keyschema.HEARTBEATS_KEY, 0, -1)
    return [m.decode() for m in found if m.decode().startswith(f"{ns} {pod} ")]


def test_enforced_follows_an_edit_at_once_and_drops_a_stopped_sidecar(
        k8s: ControlPlane, redis_server: Any, upstream: UpstreamProcess, tmp_path: Path) -> None:
    ns = f"{PREFIX}-{uuid.uuid4().hex[:6]}"
    k8s.kubectl("create", "namespace", ns)
    labels = tmp_path / "labels"
    labels.write_text('app="web"\n')
    sidecars: list[SidecarProcess] = []
    try:
        with running_operator(k8s, redis_server, ns, resync_interval_s=300.0) as op:
            sidecars = [SidecarProcess(upstream.url, "--redis", redis_server.url, "--namespace", ns,
                                       "--pod-labels", str(labels), "--pod-name", pod, "--poll-interval-s", "0.5",
                                       wait_ready=False) for pod in ("web-1", "web-2")]
            k8s.kubectl("apply", "-f", "-", input=policy_manifest("api", ns))
            first = poll(lambda: (e := enforced(op, ns))[0] == 2 and e, "Enforced = 2", timeout=60)
            assert first[2] == "True"

            k8s.kubectl("apply", "-f", "-", input=policy_manifest("api", ns, tiers=("free", "pro")))
            edited = poll(lambda: (e := enforced(op, ns)) == (2, e[1], "True") and e[1] != first[1] and e,
                          "Enforced = 2 at the new config version", timeout=60)
            assert edited[1] == op.config(ns).version

            assert members_of(redis_server, ns, "web-2")
            assert sidecars[1].terminate() == 0
            assert members_of(redis_server, ns, "web-2") == []  # withdrawn as it stopped
            assert members_of(redis_server, ns, "web-1")
            k8s.kubectl("delete", "rlp", "api", "-n", ns, "--timeout=30s")
    finally:
        for s in sidecars:
            s.close()
        k8s.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
