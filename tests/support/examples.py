"""The example policies in crds/examples and what each bad one is expected to produce."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
