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
from re2 import _re2  # the binding's RE2 class itself (see _RE2Regex)

MAX_REGEX_MEMORY = 1 << 20
"""RE2's memory budget per compiled rule regex (bytes): a pattern whose program needs more is
refused as too large; matching itself never needs more (RE2 falls back to its slower, still
linear, engine when its cache is full)."""


class PathRegex(Protocol):
    def fullmatch(self, text: str) -> bool: ...


class RegexError(ValueError):
    """A rule regex RE2 cannot compile; the message says why."""


_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH
_NO_MATCH = (-1, -1)


class _RE2Regex:
    """A compiled RE2 program, called the way the hot path needs it: whole-path match, yes or
    no. (``re2.compile(...).fullmatch`` builds a match object through a Python generator: 2.6 µs
    a call, five times the match itself.)"""

    __slots__ = ("_regexp",)

    def __init__(self, regexp: Any) -> None:
        self._regexp = regexp

    def fullmatch(self, text: str) -> bool:
        data = text.encode("utf-8", "surrogatepass")  # RE2 reads invalid UTF-8 as no character
        return bool(self._regexp.Match(_ANCHOR_BOTH, data, 0, len(data))[0] != _NO_MATCH)


def compile_regex(pattern: str, *, skip: bool = False) -> PathRegex:
    """A rule's regex as its kind of rule matches it (module doc): case-insensitive for a
    limiting rule. RegexError says why RE2 refuses it."""
    return _RE2Regex(_compile(pattern, case_sensitive=skip))


def _compile(pattern: str, *, case_sensitive: bool) -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason is raised to the caller, not printed on stderr
    options.max_mem = MAX_REGEX_MEMORY
    options.case_sensitive = case_sensitive
    options.never_capture = True  # only "does it match" is asked: no group spans to track
    regexp = _re2.RE2(pattern.encode("utf-8", "surrogatepass"), options)
    if not regexp.ok():
        reason = regexp.error()
        raise RegexError(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason))
    return regexp


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
