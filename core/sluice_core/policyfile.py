"""Reading policy files: YAML with one or more documents, or directories of them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sluice_core import yamltext
from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.model import CompiledPolicy
from sluice_core.parse import parse_policy

MAX_FILE_BYTES = 4 * 1024 * 1024


def iter_documents(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(source, document)`` for every YAML document under ``path``; ``source`` names the
    file and, for multi-document files, the document's index. Unreadable files raise."""
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.suffix in (".yaml", ".yml")) if p.is_dir() else [p]
    for f in files:
        try:
            if f.stat().st_size > MAX_FILE_BYTES:
                raise PolicyErrors([PolicyError("(file)", f"is larger than {MAX_FILE_BYTES} bytes", str(f))])
            docs = [d for d in yamltext.load_all(f.read_text("utf-8")) if d is not None]
        except OSError as exc:
            raise PolicyErrors([PolicyError("(file)", f"cannot be read: {exc.strerror}", str(f))]) from exc
        except yaml.YAMLError as exc:
            raise PolicyErrors([PolicyError("(file)", f"is not valid YAML: {yamltext.describe(exc)}",
                                            str(f))]) from exc
        for i, doc in enumerate(docs):
            yield (f"{f}#{i + 1}" if len(docs) > 1 else str(f)), doc


@dataclass(frozen=True)
class PolicyDocument:
    """A valid policy as read from a file: where it was, what it compiles to, its spec as
    written (what :func:`sluice_core.lint.policy_warnings` reads besides the policy)."""

    source: str
    policy: CompiledPolicy
    spec: Mapping[str, Any]


def load_documents(path: str | Path, *, default_namespace: str = "default") -> list[PolicyDocument]:
    """Parse every policy under ``path``; raise one :class:`PolicyErrors` with all problems."""
    out: list[PolicyDocument] = []
    errors: list[PolicyError] = []
    for source, doc in iter_documents(path):
        try:
            policy = parse_policy(doc, source=source, default_namespace=default_namespace)
        except PolicyErrors as exc:
            errors.extend(exc.errors)
            continue
        out.append(PolicyDocument(source, policy, doc["spec"]))  # parse_policy checked it is one
    if errors:
        raise PolicyErrors(errors)
    return out


def load_policies(path: str | Path, *, default_namespace: str = "default") -> list[CompiledPolicy]:
    """Parse every policy under ``path``; raise one :class:`PolicyErrors` with all problems."""
    return [d.policy for d in load_documents(path, default_namespace=default_namespace)]
