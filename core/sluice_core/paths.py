"""How a request path is compared with a rule's ``match.path``.

Rules are matched on a normalised form of the path; the request is forwarded unchanged. The
upstream decides what a path *means*, and upstreams differ (Express and ASP.NET route
case-insensitively, servlet containers drop ``;params`` and read ``..;`` as ``..``, IIS reads
``\\`` as ``/``, most frameworks ignore a trailing slash), so the two kinds of rule lean in
opposite directions, each the safe way:

- A limiting rule (``limit`` or ``cost``) matches every spelling some upstream could route to
  the same place: the path percent-decoded once (``%2F`` too), ``\\`` read as ``/``, ``;params``
  dropped from every segment, ``.``/``..`` and empty segments resolved, a trailing slash
  optional, and letters compared case-insensitively. A variant spelling cannot dodge a limit;
  at worst a path the upstream would 404 is charged like the route it resembles.
- A ``skip`` rule matches only a path sent in its plain canonical form (no percent-escape, no
  ``;``, no ``\\``, no ``.``/``..`` or empty segment), compared exactly (case-sensitive, a
  trailing slash is a different path). Any other spelling is matched by the limiting rules
  only, so a variant cannot reach a limited route through a skip rule.

Rule regexes run on RE2 (linear time in the path's length, whatever the pattern): a pattern RE2
cannot run (backreferences, lookaround) is refused when the policy is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import unquote

import re2  # type: ignore[import-untyped]

MAX_REGEX_MEMORY = 1 << 20
"""RE2's memory budget per compiled rule regex (bytes): a pattern whose program needs more is
refused as too large; matching itself never needs more (RE2 falls back to its slower, still
linear, engine when its cache is full)."""


class PathRegex(Protocol):
    def fullmatch(self, text: str) -> Any: ...


class RegexError(ValueError):
    """A rule regex RE2 cannot compile; the message says why."""


def compile_regex(pattern: str, *, case_sensitive: bool) -> PathRegex:
    options = re2.Options()
    options.log_errors = False  # the reason is raised to the caller, not printed on stderr
    options.max_mem = MAX_REGEX_MEMORY
    options.case_sensitive = case_sensitive
    try:
        compiled: PathRegex = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        raise RegexError(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)) from None
    return compiled


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A request path in the forms rules are matched against."""

    plain: str  # percent-decoded, otherwise as sent (what a skip rule compares)
    norm: str  # normalised (see the module doc); "/" or no trailing slash
    folded: str  # ``norm`` lower-cased
    canonical: bool  # sent in plain canonical form: skip rules may match it

    @property
    def slashed(self) -> str:
        """``norm`` with a trailing slash (``/`` stays ``/``): the other spelling of the path."""
        return self.norm if self.norm == "/" else self.norm + "/"


# Small: a path is matched once per policy (two at most) and popular paths repeat; a client
# sending long random paths must not fill memory (8 KiB paths x 256 x 4 forms: 8 MiB at most).
@lru_cache(maxsize=256)
def request_path(raw: str) -> RequestPath:
    """``raw`` is the path as sent (percent-encoded, no query)."""
    plain = unquote(raw) if "%" in raw else raw
    norm = normalise(plain)
    canonical = (not any(c in raw for c in "%;\\")
                 and (raw == norm or (norm != "/" and raw == norm + "/")))
    return RequestPath(plain, norm, norm.lower(), canonical)


def normalise(path: str) -> str:
    """``/a//b/./c;x=1/../d/`` -> ``/a/b/d``: a decoded path in the form limiting rules see."""
    if "\\" in path:
        path = path.replace("\\", "/")
    out: list[str] = []
    for segment in path.split("/"):
        segment = segment.split(";", 1)[0]  # drop ;params first, so "..;" is ".." as Tomcat reads it
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def normalise_rule_path(text: str) -> str:
    """An ``exact`` rule path in the form it is compared in (a limiting rule's)."""
    return normalise(text).lower()
