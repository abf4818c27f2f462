"""README.md's settings reference tables, made from the settings dataclasses.

``python hack/settings_tables.py`` rewrites every table between its markers
(``<!-- settings:NAME -->`` ... ``<!-- /settings:NAME -->``); tests/test_docs.py fails, naming
the row, while README.md differs from what the dataclasses give.
"""

from __future__ import annotations

import re
from pathlib import Path

from sluice_core.settingsform import reference_rows
from sluice_core.sidecar_settings import SidecarSettings
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.settings import OperatorSettings

README = Path(__file__).resolve().parents[1] / "README.md"
HEADERS = {"flag": "flag", "env": "env", "chart": "chart value", "default": "default", "meaning": "meaning"}
TABLES: dict[str, tuple[type, tuple[str, ...]]] = {
    "sidecar": (SidecarSettings, ("flag", "env", "default", "meaning")),
    "operator": (OperatorSettings, ("flag", "env", "chart", "default", "meaning")),
    "injector": (InjectionSettings, ("flag", "env", "chart", "default", "meaning")),
}


def table(name: str) -> list[str]:
    cls, columns = TABLES[name]
    return ["| " + " | ".join(HEADERS[c] for c in columns) + " |",
            "|" + "---|" * len(columns), *reference_rows(cls, columns)]


def marked(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- settings:{name} -->\n)(.*?)(<!-- /settings:{name} -->)", re.S)


def rewrite(text: str) -> str:
    for name in TABLES:
        text, found = marked(name).subn(lambda m, n=name: m[1] + "\n".join(table(n)) + "\n" + m[3], text)
        if not found:
            raise SystemExit(f"README.md has no <!-- settings:{name} --> table")
    return text


if __name__ == "__main__":
    README.write_text(rewrite(README.read_text()))
