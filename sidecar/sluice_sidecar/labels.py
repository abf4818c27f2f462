"""Pod labels from a Kubernetes downward-API file (``key="value"`` per line)."""

from __future__ import annotations

import json
from pathlib import Path


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"pod labels file: expected key=\"value\", got {line[:80]!r}")
        value = value.strip()
        if value.startswith('"'):
            value = json.loads(value)  # the downward API writes Go-quoted strings: JSON-compatible
        labels[key.strip()] = value
    return labels


def read_labels(path: str | Path) -> dict[str, str]:
    return parse_labels(Path(path).read_text("utf-8"))
