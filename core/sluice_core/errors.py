"""Validation errors that name the field path and the reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyError:
    """One problem in a policy: ``path`` is a dotted field path such as ``spec.tiers[1].requests``."""

    path: str
    reason: str
    source: str = ""  # file name or object name, when known

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.path}: {self.reason}"


class PolicyErrors(ValueError):
    """Raised when a policy document is invalid; carries every error found, not just the first."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
