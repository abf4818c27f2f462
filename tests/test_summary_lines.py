"""The short summary keeps a failure's headline where CI shows it (support/summary.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.summary import SUMMARY_LINE_CHARS, SUMMARY_LINES, short_message

pytest_plugins = ["pytester"]


def test_a_long_message_keeps_its_first_lines_and_says_how_many_went() -> None:
    message = "helm install failed\n" + "\n".join(f"log line {i}" for i in range(40))
    lines = short_message(message).splitlines()
    assert lines[0] == "helm install failed"
    assert len(lines) == SUMMARY_LINES + 1 and lines[-1] == "... (29 more lines in the report above)"
    assert short_message("one line") == "one line"
    assert len(short_message("x" * 5000)) == SUMMARY_LINE_CHARS + 4


def test_ci_summary_of_a_failing_run_is_short(pytester: pytest.Pytester,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real pytest run with CI set, this suite's conftest hook in it: the summary line of a
    failure with a 40-line message shows the headline and not the 40th line."""
    monkeypatch.setenv("CI", "true")
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    pytester.makeconftest("""
import pytest
from support.summary import short_message

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    crash = getattr(report.longrepr, "reprcrash", None)
    if report.failed and crash is not None:
        crash.message = short_message(crash.message)
""")
    pytester.makepyfile("""
import pytest
def test_install():
    pytest.fail("helm install failed\\n" + "\\n".join(f"pod line {i}" for i in range(40)), pytrace=False)
""")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    summary = result.stdout.str().split("short test summary info", 1)[1]
    assert "Failed: helm install failed" in summary
    assert "pod line 39" not in summary and "29 more lines" in summary
