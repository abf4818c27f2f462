"""The analytics API's query parameters, checked before any SQL runs: a bad one is a
:class:`ParamError` naming it (a 400 problem+json), and every range, step and list size is
bounded (:mod:`sluice_analytics.queries`).

Times are unix seconds or RFC 3339 with a zone (``2026-11-29T06:00:00Z``); a range is moved out
to whole minutes (``start`` down, ``end`` up), the finest rollup, or to whole hours (days) when
it is too long to read at minutes (hours). Steps and windows take
``90``, ``30s``, ``5m``, ``1h``, ``1d``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sluice_core.model import CLUSTER_SCOPE
from sluice_core.usage import MAX_TEXT

from sluice_analytics.queries import (
    BY,
    MAX_LIMIT,
    MAX_LIMITED_MINUTES,
    MAX_PERIODS,
    MAX_POINTS,
    Filter,
    table_for,
)
from sluice_analytics.schema import PERIODS

MAX_REPORT_DAYS = 400
MAX_RANGE_DAYS = 401
DEFAULT_RANGE_S = 3600
_DURATION = re.compile(r"^([0-9]{1,9})([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Times between 2000 and 2200: anything else is a typo (ms for s) or an attempt at overflow.
_MIN_T, _MAX_T = 946_684_800, 7_258_118_400


class ParamError(ValueError):
    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


@dataclass(frozen=True)
class Range:
    start: int
    end: int


def _digits(value: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²" and other scripts' digits, some of
    which ``int`` refuses."""
    return value.isascii() and value.isdigit()


def only(query: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Refuse unknown parameters (a typo must not silently widen a query)."""
    known = set(allowed)
    for name in query:
        if name not in known:
            raise ParamError(name, f"unknown parameter (accepted: {', '.join(sorted(known))})")


def text(query: Mapping[str, str], name: str, *, required: bool = False) -> str | None:
    value = query.get(name)
    if value is None or value == "":
        if required:
            raise ParamError(name, "required")
        return None
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise ParamError(name, f"at most {MAX_TEXT} printable characters")
    return value


def instant(name: str, value: str) -> int:
    if _digits(value) and len(value) <= 12:
        t = int(value)
    else:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ParamError(name, "expected unix seconds or RFC 3339 (2026-11-29T06:00:00Z)") from None
        if parsed.tzinfo is None:
            raise ParamError(name, "give a time zone (Z or +HH:MM)")
        t = int(parsed.timestamp())
    if not _MIN_T <= t <= _MAX_T:
        raise ParamError(name, "out of range (years 2000 to 2200)")
    return t


def duration(name: str, value: str, *, least: int, most: int) -> int:
    m = _DURATION.match(value.strip())
    if not m:
        raise ParamError(name, "expected seconds or a duration like 30s, 5m, 1h, 1d")
    s = int(m.group(1)) * _UNITS[m.group(2)]
    if not least <= s <= most:
        raise ParamError(name, f"between {least} and {most} seconds")
    return s


def time_range(query: Mapping[str, str], now: float | None = None) -> Range:
    """``start`` / ``end`` (default: the last hour), moved out to whole minutes, or to whole
    hours / days when the range is too long to read at minutes / hours (at most
    :data:`MAX_PERIODS` periods of the table read); at most :data:`MAX_RANGE_DAYS` days."""
    now_s = int(time.time() if now is None else now)
    end = instant("end", query["end"]) if query.get("end") else now_s
    start = instant("start", query["start"]) if query.get("start") else end - DEFAULT_RANGE_S
    if end <= start:
        raise ParamError("end", "must be after start")
    if end - start > MAX_RANGE_DAYS * 86400:
        raise ParamError("start", f"range too large: at most {MAX_RANGE_DAYS} days (the day table's retention)")
    for name in ("minute", "hour", "day"):
        p = PERIODS[name]
        s, e = start - start % p, end + -end % p
        if (e - s) // PERIODS[table_for(s, e)] <= MAX_PERIODS:
            return Range(s, e)
    raise AssertionError("unreachable: 400 days are fewer than MAX_PERIODS days")


def step(query: Mapping[str, str], rng: Range) -> tuple[Range, int]:
    """The series' step (default: about 60 points), a whole number of minutes; the range's end
    is moved out to a whole number of steps."""
    span = rng.end - rng.start
    if query.get("step"):
        s = duration("step", query["step"], least=60, most=400 * 86400)
        if s % 60:
            raise ParamError("step", "a whole number of minutes (60, 5m, 1h, 1d)")
    else:
        s = max(60, -(-span // 60) // 60 * 60 or 60)
    points = -(-span // s)
    if points > MAX_POINTS:
        least = -(-span // MAX_POINTS)
        raise ParamError("step", f"too small for the range: at most {MAX_POINTS} points (at least "
                                 f"{-(-least // 60) * 60} s here)")
    out = Range(rng.start, rng.start + points * s)
    if span // PERIODS[table_for(out.start, out.end, s)] > MAX_PERIODS:
        raise ParamError("step", f"a whole number of hours (days) for this range: at minutes it would "
                                 f"read more than {MAX_PERIODS} periods")
    return out, s


def limit(query: Mapping[str, str], default: int = 10) -> int:
    value = query.get("limit")
    if not value:
        return default
    if not _digits(value) or len(value) > 6 or not 1 <= int(value) <= MAX_LIMIT:
        raise ParamError("limit", f"an integer from 1 to {MAX_LIMIT}")
    return int(value)


def by(query: Mapping[str, str]) -> str:
    value = query.get("by") or "requests"
    if value not in BY:
        raise ParamError("by", f"one of {', '.join(BY)}")
    return value


def minutes(query: Mapping[str, str]) -> int:
    value = query.get("minutes") or "5"
    if not _digits(value) or len(value) > 6 or not 1 <= int(value) <= MAX_LIMITED_MINUTES:
        raise ParamError("minutes", f"an integer from 1 to {MAX_LIMITED_MINUTES}")
    return int(value)


def day(name: str, value: str | None) -> int:
    if not value:
        raise ParamError(name, "required (YYYY-MM-DD)")
    try:
        d = date.fromisoformat(value)
    except ValueError:
        raise ParamError(name, "expected a date YYYY-MM-DD") from None
    return instant(name, str(int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())))


def days(query: Mapping[str, str]) -> Range:
    """``from`` .. ``to``, whole UTC days, both included."""
    start = day("from", query.get("from"))
    end = day("to", query.get("to")) + 86400
    if end <= start:
        raise ParamError("to", "must not be before from")
    if (end - start) // 86400 > MAX_REPORT_DAYS:
        raise ParamError("to", f"at most {MAX_REPORT_DAYS} days")
    return Range(start, end)


def policy_filter(query: Mapping[str, str], namespace: str) -> str | None:
    """``policy``: ``NAMESPACE/NAME`` (a ClusterRateLimitPolicy: ``_cluster/NAME``), or a bare
    name meaning ``<namespace>/NAME``. It must be of the namespace asked about, or cluster-wide."""
    value = text(query, "policy")
    if value is None:
        return None
    ns, sep, name = value.rpartition("/")
    if not sep:
        return f"{namespace}/{value}"
    if not name or ns not in (namespace, CLUSTER_SCOPE):
        raise ParamError("policy", f"NAME, {namespace}/NAME or {CLUSTER_SCOPE}/NAME")
    return value


def usage_filter(query: Mapping[str, str], *, client: str | None = None) -> Filter:
    namespace = text(query, "namespace", required=True)
    assert namespace is not None
    return Filter(namespace, policy_filter(query, namespace), client or text(query, "client"),
                  text(query, "endpoint"))
