"""Reading Kubernetes objects as the API server sends them: JSON in which any field may be
missing or of an unexpected type (webhooks must not trip over an odd manifest)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def nested(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or is not an object."""
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj
