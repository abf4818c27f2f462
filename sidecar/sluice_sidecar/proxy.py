"""The streaming reverse proxy to the one configured upstream.

Bodies stream both ways without a size cap (small upstream replies are read whole, which is
cheaper). Hop-by-hop headers are dropped in both directions, ``X-Forwarded-For`` is appended
and ``X-Forwarded-Proto`` set when absent. Only the configured upstream is ever contacted: the
request target is used as a path, never as a URL, so this is not an open proxy.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sluice_sidecar.metrics import Metrics
from sluice_sidecar.problem import problem

log = logging.getLogger("sluice.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
SMALL_BODY = 64 * 1024  # upstream bodies up to this size are read whole, not streamed
CHUNK = 64 * 1024


def _strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    extra = {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk not in HOP_BY_HOP and lk not in extra:
            out.add(k, v)
    return out


class Proxy:
    def __init__(self, upstream: str, metrics: Metrics, *, connect_timeout: float = 2.0,
                 read_timeout: float = 60.0, max_connections: int = 1024) -> None:
        base = URL(upstream)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"--upstream must be an http(s)://host:port URL, got {upstream!r}")
        self.base = str(base.with_path("").with_query(None)).rstrip("/")
        self.metrics = metrics
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                         keepalive_timeout=30, ttl_dns_cache=30)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout,
                                          sock_read=self._read_timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.BaseRequest, peer: str,
                      rate_headers: list[tuple[str, str]]) -> web.StreamResponse:
        assert self._session is not None
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            return problem(400, "Bad Request", "the request target must be a path (origin-form)")
        headers = _strip_hop_by_hop(request.headers)
        xff = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        data = request.content if request.body_exists else None
        url = URL(self.base + raw_path, encoded=True)
        self.metrics.inflight.inc()
        try:
            async with self._session.request(request.method, url, headers=headers, data=data,
                                             allow_redirects=False) as up:
                return await self._relay(request, up, rate_headers)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self.metrics.upstream_errors.labels("timeout").inc()
            return problem(504, "Gateway Timeout", "the upstream did not answer in time",
                           headers=rate_headers)
        except aiohttp.ClientConnectorError:
            self.metrics.upstream_errors.labels("refused").inc()
            return problem(502, "Bad Gateway", "the upstream refused the connection",
                           headers=rate_headers)
        except aiohttp.ClientError as exc:
            self.metrics.upstream_errors.labels("protocol").inc()
            log.info("upstream error on %s %s: %s", request.method, request.path, type(exc).__name__)
            return problem(502, "Bad Gateway", "the upstream connection failed", headers=rate_headers)
        finally:
            self.metrics.inflight.dec()

    async def _relay(self, request: web.BaseRequest, up: aiohttp.ClientResponse,
                     rate_headers: list[tuple[str, str]]) -> web.StreamResponse:
        headers = _strip_hop_by_hop(up.headers)
        for k, v in rate_headers:
            headers.add(k, v)
        length = up.content_length
        if request.method == "HEAD" or up.status in (204, 304) or (length is not None and length <= SMALL_BODY):
            body = await up.read()
            headers.popall("Content-Length", None)
            whole = web.Response(status=up.status, reason=up.reason, headers=headers, body=body or None)
            if request.method == "HEAD" and length is not None:
                whole.headers["Content-Length"] = str(length)
            return whole
        headers.popall("Content-Length", None)
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        async for chunk in up.content.iter_chunked(CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
