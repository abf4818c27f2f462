"""Installing Sluice's CRDs into the test control plane and waiting until they are usable."""

from __future__ import annotations

from support.control_plane import ControlPlane
from support.examples import ROOT
from support.polling import poll

CRD_DIR = ROOT / "crds"
CRD_NAMES = ("ratelimitpolicies.sluice.dev", "clusterratelimitpolicies.sluice.dev")


def established(cp: ControlPlane, name: str) -> bool:
    crd = cp.kubectl_json("get", "crd", name)
    conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
    return conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"


def apply_crds(cp: ControlPlane) -> ControlPlane:
    """``kubectl apply -f crds/`` (the directory only: not examples/), then wait until both CRDs
    are Established and discovery and the OpenAPI document know them (a fraction of a second
    later: ``kubectl explain`` works)."""
    cp.kubectl("apply", "-f", str(CRD_DIR))
    for name in CRD_NAMES:
        poll(lambda name=name: established(cp, name), f"CRD {name} Established")
    for short in ("rlp", "crlp"):
        poll(lambda short=short: cp.kubectl("explain", short, check=False).returncode == 0,
             f"kubectl explain {short} (discovery, OpenAPI)")
    return cp
