"""What a failure leaves in pytest's short summary (tests/conftest.py sets it on each report).

With CI set, pytest's short summary prints each failure's whole message, and CI reports only the
last lines of the run: a diagnosis of many lines (logs, kubectl describe) would hide the
headline of every failure but the last. The summary keeps the first lines; the report above it
keeps everything.
"""

from __future__ import annotations

SUMMARY_LINES = 12
SUMMARY_LINE_CHARS = 300


def short_message(message: str) -> str:
    lines = message.splitlines()
    kept = [line if len(line) <= SUMMARY_LINE_CHARS else line[:SUMMARY_LINE_CHARS] + " ..."
            for line in lines[:SUMMARY_LINES]]
    if len(lines) > SUMMARY_LINES:
        kept.append(f"... ({len(lines) - SUMMARY_LINES} more lines in the report above)")
    return "\n".join(kept)
