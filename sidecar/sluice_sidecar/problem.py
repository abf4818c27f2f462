"""``application/problem+json`` (RFC 9457) responses."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"


def problem(status: int, title: str, detail: str, *, type_: str = "about:blank",
            headers: list[tuple[str, str]] | None = None, **extra: Any) -> web.Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    resp = web.Response(status=status, body=json.dumps(body).encode(), content_type=CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    for k, v in headers or ():
        resp.headers.add(k, v)
    return resp
