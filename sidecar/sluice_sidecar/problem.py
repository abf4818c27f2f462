"""``application/problem+json`` (RFC 9457) responses, and every problem type the sidecar sends."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"

PROBLEM_BASE = "https://sluice.dev/problems/"
RATE_LIMITED = PROBLEM_BASE + "rate-limited"  # 429: a bucket is empty
API_KEY_REQUIRED = PROBLEM_BASE + "api-key-required"  # 401: the policy requires a known key
LIMITER_UNAVAILABLE = PROBLEM_BASE + "limiter-unavailable"  # 503: no policy, or the store failed closed
OVERLOADED = PROBLEM_BASE + "overloaded"  # 503: load shed (connection or in-flight caps)


def problem(status: int, title: str, detail: str, *, type_: str = "about:blank",
            headers: list[tuple[str, str]] | None = None, **extra: Any) -> web.Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    resp = web.Response(status=status, body=json.dumps(body).encode(), content_type=CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    for k, v in headers or ():
        resp.headers.add(k, v)
    return resp
