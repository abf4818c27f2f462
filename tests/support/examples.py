"""The example policies in crds/examples and what each bad one is expected to produce; the
Kubernetes version the local control plane runs."""

from __future__ import annotations

import re
from pathlib import Path

from support.paths import ROOT

EXAMPLES = ROOT / "crds" / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BAD = sorted((EXAMPLES / "bad").glob("*.yaml"))


def expectation(path: Path, tag: str = "expect") -> str:
    """The text of the ``# <tag>: ...`` comment line of an example (``expect``: what
    ``sluice check`` says; ``expect-crd``: what the API server says)."""
    prefix = f"# {tag}:"
    for line in path.read_text().splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise AssertionError(f"{path} has no '{prefix}' line")


def k8s_version() -> str:
    """The Kubernetes minor the local control plane runs (hack/k8s/versions.env), as
    ``kubernetes_validate`` names it: ``"<major>.<minor>.0"``."""
    text = (ROOT / "hack" / "k8s" / "versions.env").read_text()
    m = re.search(r"^KUBERNETES_VERSION=v(\d+)\.(\d+)", text, re.M)
    assert m, "KUBERNETES_VERSION not found in hack/k8s/versions.env"
    return f"{m[1]}.{m[2]}.0"
