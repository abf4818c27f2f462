"""YAML as Sluice reads it: safe, and strict about duplicate mapping keys.

Plain YAML loaders keep the *last* value of a key given twice: in a keys file that silently
turned a paying customer's key into a free one. Here a duplicate key is an error naming its line
and column (and the first one's), never the key: a keys file may hold plaintext API keys, so no
error message quotes the file's text (PyYAML's own messages include the offending line).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, mark: Mark, first: Mark) -> None:
        super().__init__(f"a mapping key is given twice, at line {mark.line + 1}, column "
                         f"{mark.column + 1} and line {first.line + 1}, column {first.column + 1} "
                         "(YAML would keep only the last value)")


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Hashable, Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # "<<: *base" then overriding a key is not a duplicate
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base constructor refuses it
            if key in seen:
                raise DuplicateKeyError(key_node.start_mark, seen[key])
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_StrictLoader))  # a SafeLoader subclass: safe


def describe(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without quoting the text (which may hold secrets)."""
    if isinstance(exc, MarkedYAMLError):
        what = "; ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what
    return str(exc)
