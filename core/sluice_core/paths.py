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

A rule's own ``exact`` or ``prefix`` text is read like a request target. A limiting rule's text
goes through the same steps as the request (decoded once, ``;params`` dropped, dot and empty
segments resolved, lower-cased; a prefix keeps its trailing slash), so a request spelled like
the rule always matches it. A skip rule's text must already be in plain canonical form: any
other text could never match, and the parser refuses it.

Rule regexes run on RE2 (linear time in the path's length, whatever the pattern): a pattern RE2
cannot run (backreferences, lookaround) is refused when the policy is parsed. The regexes of one
policy share a memory budget (:func:`regex_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import unquote

import re2  # type: ignore[import-untyped]
from re2 import _re2  # the binding's RE2 class itself (see _RE2Regex)

MAX_REGEX_MEMORY = 1 << 20
"""RE2's memory budget for one rule regex at most (bytes): its program and its match cache. A
pattern whose program needs more than its budget is refused as too large; matching never needs
more (RE2 falls back to its slower, still linear, engine when its cache is full)."""
POLICY_REGEX_MEMORY = 8 << 20
"""The budget shared by all the regexes of one policy (bytes): with two policies applied and the
old ones kept during a reload, at most 32 MiB of a sidecar's memory goes to regexes."""
MAX_REGEX_RULES = 32
"""Regex rules per policy: each keeps at least ``POLICY_REGEX_MEMORY / MAX_REGEX_RULES``
(256 KiB), enough for realistic route patterns (most compile in under 32 KiB)."""


def regex_budget(count: int) -> int:
    """The memory budget (bytes) of each of a policy's ``count`` regex rules."""
    return min(MAX_REGEX_MEMORY, POLICY_REGEX_MEMORY // max(count, 1))


class PathRegex(Protocol):
    def fullmatch(self, data: bytes) -> bool:
        """``data``: one of the UTF-8 forms prepared by :class:`RequestPath`."""


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

    def fullmatch(self, data: bytes) -> bool:
        return bool(self._regexp.Match(_ANCHOR_BOTH, data, 0, len(data))[0] != _NO_MATCH)


def compile_regex(pattern: str, *, skip: bool = False, max_mem: int = MAX_REGEX_MEMORY) -> PathRegex:
    """A rule's regex as its kind of rule matches it (module doc): case-insensitive for a
    limiting rule, within ``max_mem`` bytes (:func:`regex_budget`). RegexError says why RE2
    refuses it."""
    return _RE2Regex(_compile(pattern, case_sensitive=skip, max_mem=max_mem))


def _compile(pattern: str, *, case_sensitive: bool, max_mem: int) -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason is raised to the caller, not printed on stderr
    options.max_mem = max_mem
    options.case_sensitive = case_sensitive
    options.never_capture = True  # only "does it match" is asked: no group spans to track
    regexp = _re2.RE2(pattern.encode("utf-8", "surrogatepass"), options)
    if not regexp.ok():
        reason = regexp.error()
        raise RegexError(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason))
    return regexp


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A request path in the forms rules are matched against, each built once per distinct path
    (:func:`request_path` caches them), so matching a rule allocates nothing."""

    plain: str  # percent-decoded, otherwise as sent (what a skip rule compares)
    norm: str  # normalised (see the module doc); "/" or no trailing slash
    folded: str  # ``norm`` lower-cased
    canonical: bool  # sent in plain canonical form: skip rules may match it
    folded_slashed: str  # ``folded`` with a trailing slash ("/" stays "/"): for prefix rules
    plain_bytes: bytes  # ``plain`` in UTF-8: for a skip rule's regex
    norm_bytes: bytes  # ``norm`` in UTF-8: for a limiting rule's regex
    slashed_bytes: bytes | None  # ``norm`` with a trailing slash, in UTF-8 (None for "/")


# Small: a path is matched once per policy (two at most) and popular paths repeat; a client
# sending long random paths must not fill memory (8 KiB paths x 256 x 7 forms: 14 MiB at most).
@lru_cache(maxsize=256)
def request_path(raw: str) -> RequestPath:
    """``raw`` is the path as sent (percent-encoded, no query)."""
    plain = unquote(raw) if "%" in raw else raw
    norm = normalise(plain)
    folded = norm.lower()
    slashed = None if norm == "/" else _utf8(norm + "/")
    return RequestPath(plain, norm, folded, is_canonical(raw, norm),
                       folded if norm == "/" else folded + "/", _utf8(plain), _utf8(norm), slashed)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # RE2 reads invalid UTF-8 as no character


def is_canonical(raw: str, norm: str | None = None) -> bool:
    """``raw`` (as sent) is in plain canonical form: no percent-escape, ``;`` or ``\\``, and
    normalising it changes nothing but a trailing slash."""
    if norm is None:
        norm = normalise(raw)
    return (not any(c in raw for c in "%;\\")
            and (raw == norm or (norm != "/" and raw == norm + "/")))


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


def limiting_rule_text(text: str, *, prefix: bool) -> str:
    """A limiting rule's ``exact`` or ``prefix`` read like a request target (module doc): decoded
    once, normalised and lower-cased; a prefix keeps its trailing slash (``/api/`` does not
    match ``/apis``)."""
    plain = unquote(text) if "%" in text else text
    norm = normalise(plain).lower()
    if prefix and norm != "/" and plain.replace("\\", "/").endswith("/"):
        norm += "/"
    return norm


def skip_rule_text_canonical(text: str, *, prefix: bool) -> bool:
    """A skip rule's text can match some request: it is in plain canonical form (a prefix only
    needs to begin one: ``/docs/.`` begins ``/docs/.well-known``)."""
    return is_canonical(text + "x" if prefix else text)


REGEX_NEVER_MATCHED = ("%", ";", "//")
"""What a rule regex may mention but no path it is matched against contains: a ``;param`` or an
empty segment is gone, and a percent-escape is decoded (only ``%25`` leaves a ``%``)."""


def regex_never_matched(pattern: str) -> list[str]:
    """The parts of :data:`REGEX_NEVER_MATCHED` that ``pattern`` mentions (a hint, not a proof:
    ``[^;]`` mentions ``;`` and is fine)."""
    return [part for part in REGEX_NEVER_MATCHED if part in pattern]
