"""Client connections of the data port, bounded so that no client can exhaust the sidecar's memory.

aiohttp caps each request line and header field (``max_line_size``, ``max_field_size``) and the
number of fields (``max_headers``), and closes idle keep-alive connections
(``keepalive_timeout``). What it lacks is added here, per connection; a request costs a clock
read, a few integer operations and one pass over its parsed header list (no allocation):

- a limit on the whole request head (request line and all fields): 100 fields of 8 KB each
  passed aiohttp's checks, and 150 such requests held against a slow upstream took 400 MB;
- a head-read timeout (slowloris): a new connection's first request head must be complete
  within ``header_timeout`` of the connection opening (its first byte does not restart the
  clock, so one byte cannot hold a place twice as long), and every later head within
  ``header_timeout`` of its first byte; else the connection is closed without an answer (the
  client is not reading one; nothing has been forwarded);
- a cap on open connections, and a cap per client address (an IPv6 client by its /64,
  :func:`~sluice_core.keyschema.ip_group`) so that one host cannot take every place: one past
  either is answered ``503`` (problem+json, ``Connection: close``) and closed, none of its
  bytes parsed. The trusted proxies of the loaded policy are exempt from the per-client cap
  (behind an ingress every connection comes from it). At the global cap a new connection is
  refused rather than an idle keep-alive one closed for it (as nginx does): telling "idle"
  apart needs aiohttp's private request state, and a close that crosses a request the client
  just sent on that connection loses it; the per-client cap already keeps one host from
  filling the table.
- a send timeout (nginx's ``send_timeout``): a client that takes no byte of a response for
  ``client_timeout`` while the sidecar has more for it than the transport's high-water mark is
  aborted (the head is out: a truncated response is all HTTP allows), so a client that stops
  reading cannot hold an in-flight slot and its buffers for ever. The timer runs only while
  writing is paused, so a response the client keeps up with costs nothing;
- a body timeout (nginx's ``client_body_timeout``, :func:`client_body`): a request body that
  stops arriving for ``client_timeout`` ends the request with ``408`` and closes the connection.

A head over the limit, or with too many fields, or a field over ``max_field_size``, is answered
``431`` and the connection closed. Both refusals half-close and wait briefly for the client to
close first (:data:`LINGER_S`): closing on unread bytes would reset the connection and can
destroy the answer. Refusals and timeouts are counted in ``sluice_overload_refusals_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

# aiohttp's own record of a request that failed to parse (answered through handle_error); a
# private name, stable in the pinned aiohttp (hack/constraints.txt).
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from sluice_core.keyschema import ip_group

from sluice_sidecar.metrics import Metrics
from sluice_sidecar.problem import CONTENT_TYPE, OVERLOADED, problem

log = logging.getLogger("sluice.sidecar")

_TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's BadHttpMessage text for max_headers
_SLACK = 256  # bytes of a read left unattributed before they count as the next head's


def _refusal_bytes(status: int, detail: str) -> bytes:
    """A complete ``Connection: close`` problem+json answer, built once: a refused connection
    costs one write."""
    title = HTTPStatus(status).phrase
    body = json.dumps({"type": OVERLOADED, "title": title, "status": status,
                       "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {title}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nRetry-After: 1\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


CONNECTIONS_FULL = _refusal_bytes(503, "too many open connections; retry shortly")
CLIENT_CONNECTIONS_FULL = _refusal_bytes(503, "too many open connections from this client; "
                                              "retry shortly")
LINGER_S = 2.0
"""After a 431 or 503 refusal the client may still be sending: the sidecar half-closes and reads
(and drops) until the client closes, at most this long. Closing with unread bytes would reset
the connection, and the reset can destroy the answer before the client reads it."""


WRITE_HIGH_WATER = 16 * 1024
"""Response bytes the transport holds before the relay waits for the client (the kernel's
socket buffer, outside the process, holds far more): a stalled client then holds this plus one
chunk here, not 64 KiB plus two (uvloop's default, aiohttp draining every 64 KiB)."""


class BodyTimeout(Exception):
    """The client sent no byte of its request body for ``client_timeout`` seconds."""


async def client_body(content: StreamReader, chunk_size: int, timeout: float) -> AsyncIterator[bytes]:
    """The request body in chunks of at most ``chunk_size`` (what has arrived), raising
    :class:`BodyTimeout` when the client sends nothing for ``timeout`` seconds. The timer exists
    only while waiting on an empty buffer: a body that came with its head costs none, and a body
    held back by a slow upstream (flow control stops reading the client) never times out."""
    while True:
        chunk = content.read_nowait(chunk_size)
        if not chunk:
            if content.at_eof():
                return
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                raise BodyTimeout(f"no request body bytes for {timeout:g} s") from None
            if not chunk:
                return
        yield chunk


class HeadTooLarge(BadHttpMessage):
    """The request head went over ``max_request_header_bytes``."""


def head_size(message: RawRequestMessage) -> int:
    """Bytes of a parsed request head, as sent give or take whitespace: request line and fields."""
    size = len(message.method) + len(message.path) + 13  # " ", " HTTP/1.1\r\n", final CRLF
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def is_header_limit(exc: BaseException | None) -> bool:
    """aiohttp's parse errors that mean "headers too large": a field over max_field_size (or
    the request line over max_line_size) or more than max_headers fields."""
    return isinstance(exc, (LineTooLong, HeadTooLarge)) or (
        isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS)


class GuardedHandler(RequestHandler):
    """One client connection: aiohttp's handler plus the head limits and the quiet errors.

    aiohttp answers unparseable requests with a text page that echoes part of the request and
    logs a traceback at ERROR for each: a log-flooding lever for anyone. Here they get a terse
    problem+json, a debug log line and a counter."""

    __slots__ = ("_client", "_head_bytes", "_head_deadline", "_head_open", "_head_timer",
                 "_last_payload", "_refused", "_send_left", "_send_timer", "_shed", "guard")

    def __init__(self, guard: DataServer, **kwargs: Any) -> None:
        super().__init__(guard, loop=guard.loop, **kwargs)
        self.guard = guard
        self._refused = False  # over the connection cap: never set up
        self._client: str | None = None  # counted against the per-client cap under this key
        self._shed = False  # refused mid-stream: further bytes are dropped unparsed
        self._head_open = False  # a request head is expected or being read
        self._head_bytes = 0
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last parsed request: while it is incomplete, bytes are body bytes
        # (bounded by the payload's own flow control), not a head.
        self._last_payload: StreamReader = EMPTY_PAYLOAD
        self._send_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._send_left = 0  # bytes the transport held when the send timer was (re)armed

    # Connection cap -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if guard.open >= guard.max_connections:
            self._refuse_connection(transport, "connections", CONNECTIONS_FULL)
            return
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else ""
        if not guard.trusts(peer):
            client = ip_group(peer)
            count = guard.clients.get(client, 0)
            if count >= guard.max_client_connections:
                self._refuse_connection(transport, "client_connections", CLIENT_CONNECTIONS_FULL)
                return
            # One entry per client with an open connection: at most max_connections entries.
            guard.clients[client] = count + 1
            self._client = client
        super().connection_made(transport)
        cast(asyncio.Transport, transport).set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._open_head()  # the first head must be complete within header_timeout from now

    def _refuse_connection(self, transport: asyncio.BaseTransport, reason: str, answer: bytes) -> None:
        """Over a cap: answer 503 and close, never parsing a byte. The close waits (at most
        LINGER_S) for the client to close first, as after a 431, unless as many refused
        connections are already lingering as the cap allows: then it is immediate."""
        guard = self.guard
        self._refused = self._shed = True
        guard.metrics.overload_refusals.labels(reason).inc()
        transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass
        transport.write(answer)
        if guard.lingering >= guard.max_connections or not transport.can_write_eof():
            transport.close()  # sends what was written, then closes
            return
        guard.lingering += 1
        transport.write_eof()
        self._head_timer = self._loop.call_later(LINGER_S, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_send_timer()
        timer, self._head_timer = self._head_timer, None
        if timer is not None:
            timer.cancel()
        if self._refused:
            if timer is not None:  # it was lingering
                self.guard.lingering -= 1
            return  # never counted, never set up
        client, self._client = self._client, None
        if client is not None:
            clients = self.guard.clients
            left = clients[client] - 1
            if left:
                clients[client] = left
            else:
                del clients[client]
        super().connection_lost(exc)

    # Send timeout -------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        transport = self.transport
        if transport is not None and self._send_timer is None:
            self._send_left = transport.get_write_buffer_size()
            self._send_timer = self._loop.call_later(self.guard.client_timeout, self._send_expired)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def _stop_send_timer(self) -> None:
        timer, self._send_timer = self._send_timer, None
        if timer is not None:
            timer.cancel()

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or not self._paused:
            return
        left = transport.get_write_buffer_size()
        if left < self._send_left:  # the client took some bytes: slow, not stalled
            self._send_left = left
            self._send_timer = self._loop.call_later(self.guard.client_timeout, self._send_expired)
            return
        # The handler is waiting to write more (a drain), holding an in-flight slot and the
        # response's buffers. Abort, as after an upstream failure mid-body: unsent bytes are
        # dropped and the handler is cancelled (handler_cancellation), freeing both.
        self.guard.metrics.overload_refusals.labels("send_timeout").inc()
        log.debug("aborting a client connection that took no response bytes for %.1f s",
                  self.guard.client_timeout)
        transport.abort()
        self.force_close()

    # Head limits --------------------------------------------------------------------------
    def _open_head(self) -> None:
        self._head_open = True
        self._head_bytes = 0
        loop = self._loop
        self._head_deadline = loop.time() + self.guard.header_timeout
        if self._head_timer is None:  # else it fires early and re-arms (no allocation per request)
            self._head_timer = loop.call_at(self._head_deadline, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._head_open or self._force_close or self._close or self.transport is None:
            return
        if self._loop.time() < self._head_deadline:  # a later head moved the deadline
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_expired)
            return
        self.guard.metrics.overload_refusals.labels("header_timeout").inc()
        log.debug("closing a connection whose request head took over %.1f s",
                  self.guard.header_timeout)
        self._shed = True
        if self._request_in_progress:
            self.close()  # a slow pipelined head: the response in progress is finished first
        else:
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._shed:
            return
        body = self._last_payload
        if self._head_open:  # on a new connection the clock runs from connection_made
            self._head_bytes += len(data)
        elif body.is_eof():
            self._open_head()  # the first byte of the next request
            self._head_bytes = len(data)
        # else: body bytes of the request being read, bounded by the payload's flow control
        body_before = body.total_bytes
        messages = self._messages
        queued = len(messages)
        super().data_received(data)
        if len(messages) > queued:  # a head is complete (maybe more: pipelining)
            unread = self._head_bytes if self._head_open else len(data) - (body.total_bytes - body_before)
            self._head_open = False
            self._check_heads(queued, unread)
        elif self._head_open and self._head_bytes > self.guard.max_head_bytes:
            self._refuse_head(len(messages))  # still incomplete and already too large

    def _check_heads(self, first: int, unread: int) -> None:
        """The requests parsed by the last read: each head measured exactly (a read can hold
        the end of one head and the start of the next, which counting bytes cannot tell apart).
        Of the ``unread`` bytes (the head's so far, or this read's beyond a body), what the
        requests do not account for is the start of the next head, counted towards it."""
        messages = self._messages
        limit = self.guard.max_head_bytes
        for i in range(first, len(messages)):
            message, payload = messages[i]
            if isinstance(message, RawRequestMessage):
                size = head_size(message)
                if size > limit:
                    while len(messages) > i:  # it and what follows are dropped unanswered
                        messages.pop()
                    self._refuse_head(i)
                    return
                unread -= size + payload.total_bytes
            self._last_payload = payload
        # The slack absorbs the few bytes head_size cannot see (trailing spaces, a missing space
        # after ':'); chunk framing is not in total_bytes, so a chunked body overcounts here,
        # which only starts the next head's count early.
        if unread > _SLACK and self._last_payload.is_eof():
            self._open_head()
            self._head_bytes = unread
            if unread > limit:
                self._refuse_head(len(messages))

    def _refuse_head(self, at: int) -> None:
        """Answer 431 after the responses already owed, then close; parse nothing more."""
        exc = HeadTooLarge("request head too large")
        self._shed = True
        self._head_open = False
        # The parser holds the partial head (up to the limit and one read); nothing will be
        # parsed again, so let it go now rather than after the answer and the linger. (aiohttp
        # checks for None, as after connection_lost; only feeding a body would need it.)
        self._parser = None
        self._messages.insert(at, (_ErrInfo(status=431, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if is_header_limit(exc):
            self.guard.metrics.overload_refusals.labels("header_size").inc()
            log.debug("request head too large from %s: %s", request.remote, type(exc).__name__)
            self._shed = True  # the rest of the head is read and dropped, never parsed
            return _Lingering(problem(431, "Request Header Fields Too Large",
                                      "the request head is larger than this server accepts"), self)
        self.guard.metrics.bad_requests.inc()
        log.debug("unparseable request from %s: %s", request.remote, type(exc).__name__)
        resp = problem(status, HTTPStatus(status).phrase, "the request could not be parsed")
        resp.force_close()
        return resp


class _Lingering(web.Response):
    """A closing answer that, once written, half-closes and waits for the client to close
    (:data:`LINGER_S` at most; the wait ends early when it does: handler cancellation)."""

    def __init__(self, resp: web.Response, handler: GuardedHandler) -> None:
        super().__init__(status=resp.status, body=resp.body, headers=resp.headers)
        self.force_close()
        self._handler = handler

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        transport = self._handler.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        await asyncio.sleep(min(LINGER_S, self._handler.guard.header_timeout))


class DataServer(web.Server):
    """aiohttp's low-level server with :class:`GuardedHandler` connections, counted."""

    def __init__(self, handler: Any, metrics: Metrics, *, max_connections: int,
                 max_client_connections: int, trusts: Callable[[str], bool],
                 max_head_bytes: int, header_timeout: float, client_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.loop = self._loop
        self.metrics = metrics
        self.max_connections = max_connections
        self.max_client_connections = max_client_connections
        self.trusts = trusts  # is the peer a trusted proxy of the loaded policy (exempt)?
        self.clients: dict[str, int] = {}  # open connections per client (ip_group), none at 0
        self.max_head_bytes = max_head_bytes
        self.header_timeout = header_timeout
        self.client_timeout = client_timeout
        self.open = 0
        self.lingering = 0  # refused connections waiting for their client to close
        metrics.client_connections.set_function(lambda: self.open)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open -= 1

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, **self._kwargs)
