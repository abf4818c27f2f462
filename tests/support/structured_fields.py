"""The draft RateLimit / RateLimit-Policy response headers, checked as RFC 8941 Lists.

Parsing is http-sfv's (a maintained RFC 8941 implementation). It is lenient in places the RFC
is not (``q=1.`` parses), and its parameters are a dict (a duplicated key silently keeps the
last value), so :func:`parse_list` also requires the header to be exactly its own canonical
serialisation: a header the sidecar emits is always canonical, and any of those slips then
shows as a difference.
"""

from __future__ import annotations

from typing import Any

import http_sfv


def parse_list(text: str) -> http_sfv.List:
    """Parse an sf-list strictly; ValueError names what is wrong."""
    members = http_sfv.List()
    members.parse(text.encode("ascii"))  # a non-ASCII character: UnicodeEncodeError, a ValueError
    canonical = str(members)
    if canonical != text:
        raise ValueError(f"not a canonical sf-list: {text!r} (canonical: {canonical!r})")
    return members


def members(field: str, value: str, required: tuple[str, ...]) -> list[tuple[str, dict[str, int]]]:
    """``[(name, {param: int})]`` of a List of quoted names carrying the required integer
    parameters; AssertionError names the field and the reason."""
    out = []
    for m in parse_list(value):
        assert isinstance(m, http_sfv.Item), f"{field}: inner list not allowed: {value!r}"
        assert type(m.value) is str, f"{field}: member must be an sf-string (quoted), got {m.value!r} in {value!r}"
        params = dict(m.params)
        for k in required:
            assert k in params, f"{field}: parameter {k} missing in {value!r}"
            assert type(params[k]) is int and params[k] >= 0, f"{field}: {k} must be a non-negative sf-integer in {value!r}"
        out.append((m.value, params))
    return out


def check_ratelimit_headers(headers: Any) -> dict[str, dict[str, int]]:
    """Assert that ``RateLimit-Policy`` and ``RateLimit`` are present once each, parse as
    strict RFC 8941 Lists of quoted names with integer q, w / r, t, and name the same policies;
    return ``{name: {q, w, r, t}}``."""
    pol_lines = headers.getall("RateLimit-Policy", [])
    rl_lines = headers.getall("RateLimit", [])
    assert len(pol_lines) == 1 and len(rl_lines) == 1, (pol_lines, rl_lines)
    policy = members("RateLimit-Policy", pol_lines[0], ("q", "w"))
    state = members("RateLimit", rl_lines[0], ("r", "t"))
    assert [n for n, _ in policy] == [n for n, _ in state], (pol_lines, rl_lines)
    out: dict[str, dict[str, int]] = {}
    for (name, p), (_, s) in zip(policy, state, strict=True):
        assert p["q"] > 0 and p["w"] > 0
        out[name] = {"q": p["q"], "w": p["w"], "r": s["r"], "t": s["t"]}
    return out
