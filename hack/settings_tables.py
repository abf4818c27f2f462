"""README.md's settings reference tables, made from the settings dataclasses, and the list of
the variables ``--sidecar-env`` refuses, made from the injector's ``RESERVED_ENV``.

``python hack/settings_tables.py`` rewrites every table and list between its markers
(``<!-- settings:NAME -->`` ... ``<!-- /settings:NAME -->``); tests/test_docs.py fails, naming
the row, while README.md differs from what the code gives.
"""

from __future__ import annotations

import re
from pathlib import Path

from sluice_analytics.settings import AnalyticsSettings
from sluice_core.settingsform import reference_rows
from sluice_core.sidecar_settings import SidecarSettings
from sluice_operator.injection.settings import RESERVED_ENV, InjectionSettings
from sluice_operator.settings import OperatorSettings

README = Path(__file__).resolve().parents[1] / "README.md"
HEADERS = {"flag": "flag", "env": "env", "chart": "chart value", "default": "default", "meaning": "meaning"}
TABLES: dict[str, tuple[type, tuple[str, ...]]] = {
    "sidecar": (SidecarSettings, ("flag", "env", "default", "meaning")),
    "operator": (OperatorSettings, ("flag", "env", "chart", "default", "meaning")),
    "injector": (InjectionSettings, ("flag", "env", "chart", "default", "meaning")),
    "analytics": (AnalyticsSettings, ("flag", "env", "default", "meaning")),
}


def table(name: str) -> list[str]:
    cls, columns = TABLES[name]
    return ["| " + " | ".join(HEADERS[c] for c in columns) + " |",
            "|" + "---|" * len(columns), *reference_rows(cls, columns)]


def reserved_env() -> list[str]:
    """The variables ``--sidecar-env`` refuses, each with the reason the refusal gives."""
    return [f"- `{name}`: " + re.sub(r"(--[a-z-]+)", r"`\1`", reason) for name, reason in RESERVED_ENV.items()]


BLOCKS = {**{name: lambda n=name: table(n) for name in TABLES}, "reserved-env": reserved_env}


def marked(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- settings:{name} -->\n)(.*?)(<!-- /settings:{name} -->)", re.S)


def rewrite(text: str) -> str:
    for name, lines in BLOCKS.items():
        text, found = marked(name).subn(lambda m, made=lines: m[1] + "\n".join(made()) + "\n" + m[3], text)
        if not found:
            raise SystemExit(f"README.md has no <!-- settings:{name} --> block")
    return text


if __name__ == "__main__":
    README.write_text(rewrite(README.read_text()))
