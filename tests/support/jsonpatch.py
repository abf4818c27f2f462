"""An RFC 6902 JSON Patch applier for tests: what the API server does with a mutating
webhook's patch (strict: a replace of a missing member or an index out of range fails)."""

from __future__ import annotations

import copy
from typing import Any


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, patch: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in patch:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last = tokens[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if last == "-" else int(last)
                assert 0 <= index <= len(parent), op
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                assert 0 <= int(last) < len(parent), op
                parent[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(last)]
            elif kind == "test":
                assert parent[int(last)] == op["value"], op
            else:
                raise AssertionError(f"unsupported op {op}")
        else:
            assert isinstance(parent, dict), op
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "replace":
                assert last in parent, f"replace of a missing member: {op}"
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                assert parent[last] == op["value"], op
            else:
                raise AssertionError(f"unsupported op {op}")
    return doc
