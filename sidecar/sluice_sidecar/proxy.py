"""The streaming reverse proxy to the one configured upstream.

Bodies stream both ways without a size cap, with back-pressure (small upstream replies that
arrive whole are answered in one piece, which is cheaper). Hop-by-hop headers are dropped in
both directions, ``X-Forwarded-For`` is appended, and the headers by which a proxy describes the
client (``Forwarded``, ``X-Real-IP``, ``X-Forwarded-Host``, ``X-Forwarded-Proto``) are kept only
from a trusted proxy, dropped otherwise (``X-Forwarded-Proto`` is then set to the scheme the
sidecar saw): a client cannot claim another address, host or https.
Only the configured upstream is ever contacted: the request target is used as a path, never as
a URL, so this is not an open proxy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sluice_sidecar.connections import BodyTimeout, client_body
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.problem import problem
from sluice_sidecar.transport.errors import PROTOCOL, TIMEOUT, UNAVAILABLE, TransportError
from sluice_sidecar.transport.httppool import CHUNK, UpstreamPool, UpstreamResponse
from sluice_sidecar.usage_note import UsageNote

log = logging.getLogger("sluice.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Not forwarded upstream: hop-by-hop, plus Expect (the sidecar already accepted the body) and
# Content-Length (set again from what is actually sent).
_DROP_REQUEST = HOP_BY_HOP | {"expect", "content-length"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
# Believed from a trusted proxy of the policy only; from anyone else they are forged.
FROM_PROXIES = frozenset({"forwarded", "x-real-ip", "x-forwarded-host", "x-forwarded-proto"})
_MAX_LOGGED_TARGET = 200
# The transport's reason -> the ``kind`` label of sluice_upstream_errors_total.
UPSTREAM_ERROR_KIND = {UNAVAILABLE: "refused", TIMEOUT: "timeout", PROTOCOL: "protocol"}


def proxy_headers_in(headers: Mapping[str, str]) -> bool:
    """Does the request carry a header of :data:`FROM_PROXIES` (so the peer's trust matters)?"""
    return any(name in headers for name in FROM_PROXIES)


def loggable_target(request: web.BaseRequest) -> str:
    """The request target for a log line: as sent (percent-escapes kept: decoded, ``%0d%0a``
    would forge log lines), truncated; log it with ``%r``."""
    return request.rel_url.raw_path[:_MAX_LOGGED_TARGET]


def _connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()} if value else set()


def origin_form(request: web.BaseRequest) -> bool:
    """Only ``/path?query`` targets are proxied: absolute-form (``http://evil/``), authority-form
    (``CONNECT``) and asterisk-form are refused, so the sidecar is never an open proxy. So is a
    ``#fragment``, which origin-form does not allow (RFC 9112 §3.2.1): the limiter decides on
    the path without it, and the target is forwarded as sent, so ``/healthz#/../admin`` would be
    skipped as ``/healthz`` and reach an upstream that reads it as ``/admin``."""
    target = request.raw_path
    return target.startswith("/") and "#" not in target and request.method != "CONNECT"


class Proxy:
    def __init__(self, upstream: str, metrics: Metrics, *, connect_timeout: float,
                 read_timeout: float, max_connections: int, client_timeout: float) -> None:
        base = URL(upstream)
        if base.scheme != "http" or not base.host or base.path not in ("", "/") or base.query_string:
            raise ValueError(f"--upstream must be http://HOST:PORT (the app in the same pod), got {upstream!r}")
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.client_timeout = client_timeout
        self._pool_args = (base.host, base.port or 80, connect_timeout, read_timeout, max_connections)
        self.pool: UpstreamPool | None = None

    async def start(self) -> None:
        host, port, connect_timeout, read_timeout, max_connections = self._pool_args
        self.pool = UpstreamPool(host, port, connect_timeout=connect_timeout,
                                 read_timeout=read_timeout, max_connections=max_connections)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def _request_head(self, request: web.BaseRequest, peer: str, chunked: bool, length: int | None,
                      trusted_peer: bool) -> bytes:
        assert self.pool is not None
        drop = _DROP_REQUEST | _connection_tokens(request.headers.get("Connection"))
        lines = [f"{request.method} {request.raw_path} HTTP/1.1"]
        xff = None
        proto_seen = host_seen = False
        for k, v in request.headers.items():
            lk = k.lower()
            if lk in drop:
                continue
            if lk == "x-forwarded-for":
                xff = f"{xff}, {v}" if xff else v
                continue
            if lk in FROM_PROXIES:
                if not trusted_peer:
                    continue
                proto_seen = proto_seen or lk == "x-forwarded-proto"
            host_seen = host_seen or lk == "host"
            lines.append(f"{k}: {v}")
        lines.append(f"X-Forwarded-For: {xff}, {peer}" if xff else f"X-Forwarded-For: {peer}")
        if not proto_seen:
            lines.append(f"X-Forwarded-Proto: {request.scheme}")
        if not host_seen:
            lines.append(f"Host: {self.pool.host_header}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        lines.append("\r\n")
        # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: encoding the
        # same way forwards them byte for byte (latin-1 would garble UTF-8 and raise on the rest).
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")

    async def forward(self, request: web.BaseRequest, peer: str,
                      rate_headers: list[tuple[str, str]], *, trusted_peer: bool = False,
                      note: UsageNote | None = None, close: bool = False) -> web.StreamResponse:
        """Send ``request`` to the upstream and relay the answer. The caller has checked that
        the target is origin-form (:func:`origin_form`). ``close``: answer with ``Connection:
        close`` (draining; a streamed answer's head is written here). ``note``: usage analytics' record of
        the request, given the upstream's status, latency (to its response head) and bytes."""
        assert self.pool is not None
        length = request.content_length
        has_body = request.body_exists
        chunked = has_body and length is None
        head = self._request_head(request, peer, chunked, length if has_body else None, trusted_peer)
        if has_body and request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            # The limiter said yes: now invite the body (a refused client never sends it).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = client_body(request.content, CHUNK, self.client_timeout) if has_body else None
        if note is not None and body is not None:
            if chunked:  # counted as it streams (rare; with a length, the length is the count)
                body = _counted(body, note)
            else:
                note.bytes_in = length or 0
        started = time.perf_counter_ns()  # integer: no float arithmetic on the way to µs
        try:
            up = await self.pool.request(request.method, head, body, chunked)
        except TransportError as exc:
            return self._failed(request, exc, rate_headers)
        except BodyTimeout as exc:
            # Nothing was relayed yet (the body is sent before the answer is read): the request
            # ends here, and the connection with it (the rest of the body may yet come; it cannot
            # be told from a next request). The upstream connection, with its request half sent,
            # was closed by the pool.
            self.metrics.overload_refusals.labels("body_timeout").inc()
            log.debug("request body stalled on %s %r: %s", request.method, loggable_target(request), exc)
            refused = problem(408, "Request Timeout", "the request body stopped arriving")
            refused.force_close()
            return refused
        drop = _DROP_RESPONSE | _connection_tokens(
            next((v for k, v in up.headers if k.lower() == "connection"), None))
        headers: CIMultiDict[str] = CIMultiDict([(k, v) for k, v in up.headers if k.lower() not in drop])
        for k, v in rate_headers:
            headers.add(k, v)
        if note is not None:
            note.status = up.status
            note.latency_us = (time.perf_counter_ns() - started) // 1000
        if up.complete and request.method != "HEAD":
            data = up.body_now()
            if note is not None:
                note.bytes_out = len(data)
            return web.Response(status=up.status, reason=up.reason, headers=headers, body=data or None)
        return await self._stream(request, up, headers, rate_headers, note, close)

    async def _stream(self, request: web.BaseRequest, up: UpstreamResponse, headers: CIMultiDict[str],
                      rate_headers: list[tuple[str, str]], note: UsageNote | None,
                      close: bool) -> web.StreamResponse:
        """Relay a response whose body is still arriving (or a HEAD answer)."""
        chunks = up.iter_body(self.read_timeout)
        first: bytes | None = None
        if request.method != "HEAD":
            # Nothing reaches the client before the first body byte (aiohttp holds the head
            # until then anyway): an upstream that fails before it still gets a clean 502/504.
            try:
                first = await anext(chunks, None)
            except TransportError as exc:
                up.discard()
                if note is not None:
                    note.status = 0  # answered 502/504 here: the upstream's answer never came
                return self._failed(request, exc, rate_headers)
        stream = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if up.content_length is not None:
            stream.content_length = up.content_length
        if close:
            stream.force_close()
        try:
            await stream.prepare(request)
            if request.method == "HEAD":
                up.body_now()  # nothing follows a HEAD response; frees the connection
            elif first is not None:
                sent = len(first)
                if note is not None:
                    note.bytes_out = sent
                await stream.write(first)
                first = None  # not held while the client is slow (the transport has it)
                protocol, writer = request.protocol, request.writer
                async for chunk in chunks:
                    sent += len(chunk)
                    if note is not None:
                        note.bytes_out = sent
                    await stream.write(chunk)
                    # aiohttp drains only every 64 KiB it has written, so a stalled client
                    # would hold two chunks past the transport's high-water mark; waiting here
                    # holds at most one (the send timeout applies while it waits).
                    if protocol.writing_paused:
                        await writer.drain()
            await stream.write_eof()
        except TransportError as exc:
            # The head and part of the body are out: a 502 now would land inside the body. Cut
            # the client off instead, so it sees a truncated response (short of Content-Length,
            # or a chunked stream without its last chunk), as HTTP intends; nothing more is
            # written.
            up.discard()
            self.metrics.upstream_errors.labels("aborted_midbody").inc()
            log.warning("upstream failed mid-body on %s %r (%s): client connection aborted",
                        request.method, loggable_target(request), exc)
            _drop_client(request)
        except ConnectionError:
            # The client went away (or its connection broke) mid-response: the rest of this
            # upstream response will never be read, so that connection is closed, not pooled.
            up.discard()
            log.debug("client went away mid-response on %s %r", request.method, loggable_target(request))
            _drop_client(request)
        except BaseException:
            up.discard()
            raise
        return stream

    def _failed(self, request: web.BaseRequest, exc: TransportError,
                rate_headers: list[tuple[str, str]]) -> web.Response:
        """No byte of the response has been relayed yet: answer with a problem."""
        self.metrics.upstream_errors.labels(UPSTREAM_ERROR_KIND.get(exc.reason, "protocol")).inc()
        if exc.reason == TIMEOUT:
            return problem(504, "Gateway Timeout", "the upstream did not answer in time", headers=rate_headers)
        if exc.reason == UNAVAILABLE:
            return problem(502, "Bad Gateway", "the upstream refused the connection", headers=rate_headers)
        log.info("upstream error on %s %r: %s", request.method, loggable_target(request), exc)
        return problem(502, "Bad Gateway", "the upstream connection failed", headers=rate_headers)


async def _counted(body: AsyncIterator[bytes], note: UsageNote) -> AsyncIterator[bytes]:
    """``body`` as sent upstream, its bytes counted in ``note`` (usage analytics)."""
    async for chunk in body:
        note.bytes_in += len(chunk)
        yield chunk


def _drop_client(request: web.BaseRequest) -> None:
    """Abort the client connection at once (unsent bytes discarded) and tell aiohttp it is gone,
    so that nothing else (an error page, a last chunk) is written onto it."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    request.protocol.force_close()
