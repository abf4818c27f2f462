"""Durations as written in policies: ``500ms``, ``1s``, ``1m``, ``1h``, ``1d``, ``1h30m`` or plain seconds."""

from __future__ import annotations

import re

_UNITS_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:ms|s|m|h|d))+")

# A bucket period is capped so that bucket TTLs and microsecond arithmetic stay well inside
# the 2**53 integers a Lua double holds exactly.
MAX_PERIOD_US = 366 * _UNITS_US["d"]


def parse_duration_us(value: object) -> int:
    """Return the duration in microseconds; raise ``ValueError`` with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 1s, 1m, 1h, 1d or a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        us = round(value * 1_000_000)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return parse_duration_us(float(text))
        if not _WHOLE.fullmatch(text):
            raise ValueError(
                f"must be a duration like 1s, 1m, 1h, 1d or a number of seconds, got {value!r}"
            )
        us = sum(int(n) * _UNITS_US[u] for n, u in _PART.findall(text))
    else:
        raise ValueError(
            f"must be a duration like 1s, 1m, 1h, 1d or a number of seconds, got {value!r}"
        )
    if us < 1_000:
        raise ValueError(f"must be at least 1ms, got {value!r}")
    if us > MAX_PERIOD_US:
        raise ValueError(f"must be at most 366d, got {value!r}")
    return us


def format_duration_us(us: int) -> str:
    """Shortest exact spelling of a duration, used in compiled config and messages."""
    for unit in ("d", "h", "m", "s", "ms"):
        size = _UNITS_US[unit]
        if us % size == 0:
            return f"{us // size}{unit}"
    return f"{us / 1_000_000}s"
