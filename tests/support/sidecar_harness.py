"""A real upstream app and a real sidecar on loopback, for the sidecar's HTTP tests.

- :class:`Upstream`: a low-level aiohttp server on ``127.0.0.1:0`` that records every request
  it sees and answers:

  - ``/__stream/<n>``: ``n`` bytes, streamed in 64 KiB chunks (``?chunked=1``: without a
    Content-Length), counted in ``stream_sent`` as they are written;
  - ``/__sleep/<seconds>``: answers after that long (or at once when the upstream closes);
  - ``/__stall/<seconds>``: the same without reading the request body;
  - ``/__hop``: a reply carrying hop-by-hop headers the proxy must not relay;
  - ``/__utf8``: a reply with a UTF-8 header value (``UTF8_VALUE``);
  - ``/__gated``: the echo, but after the first body chunk it reads on only once ``gate`` is
    set (an app slower than its client);
  - anything else: a JSON echo of method, raw path, query, raw headers and the body length (the
    body is counted as it streams in, never held).

- :func:`start_sidecar`: writes a policy (YAML text or a dict) and optionally an API-keys file
  to a directory, starts a :class:`~sluice_sidecar.server.Sidecar` in this process on
  ``127.0.0.1:0`` against an upstream (memory store unless ``redis=`` is given) and returns a
  :class:`RunningSidecar` with its base URLs; ``await running.stop()`` stops it.
- :func:`raw_request`: write bytes on a raw socket and parse the HTTP/1.1 answer, for what an
  HTTP client library would refuse to send (garbage, absolute-form targets, ``..`` paths).
- :func:`policy_doc`: a RateLimitPolicy document with sensible defaults.
(Polling with a deadline: support/polling.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web
from sluice_core.sidecar_settings import SidecarSettings
from sluice_sidecar.server import Sidecar

T = TypeVar("T")
Factory = Callable[..., Awaitable["RunningSidecar"]]  # the ``sidecars`` fixture (tests/conftest.py)
CHUNK = 64 * 1024
UTF8_VALUE = "caf\u00e9 \u20ac"


# Upstream ------------------------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_length: int

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Upstream:
    """The app behind the sidecar. ``await start()``; ``url``; ``seen``; ``await close()``."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.stream_sent = 0  # bytes written by /__stream so far
        self.gate = asyncio.Event()  # /__gated reads past its first chunk once this is set
        self.gated_received = 0
        self._runner: web.ServerRunner | None = None
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        # Generous parser limits: whatever the sidecar should have refused reaches the handler
        # (and ``seen``) instead of being refused here.
        server = web.Server(self._handle, access_log=None, max_line_size=1 << 17,
                            max_field_size=1 << 17, max_headers=4096)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path.startswith("/__stall/"):  # reads no body, answers late
            self.seen.append(Seen(request.method, request.raw_path, [], -1))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), float(request.raw_path.rsplit("/", 1)[1]))
            return web.json_response({"stalled": True})
        gated = request.raw_path == "/__gated"
        length = 0
        async for chunk in request.content.iter_any():
            length += len(chunk)
            if gated:
                self.gated_received = length
                await self.gate.wait()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        seen = Seen(request.method, request.raw_path, headers, length)
        self.seen.append(seen)
        path = request.raw_path.partition("?")[0]
        if path.startswith("/__stream/"):
            return await self._stream(request, int(path.rsplit("/", 1)[1]),
                                      chunked="chunked=1" in request.query_string)
        if path.startswith("/__sleep/"):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), float(path.rsplit("/", 1)[1]))
            return web.json_response({"slept": True})
        if path == "/__utf8":
            resp = web.json_response({"utf8": True})
            resp.headers["X-Utf8"] = UTF8_VALUE  # aiohttp sends it UTF-8 encoded
            return resp
        if path == "/__hop":
            resp = web.json_response({"hop": True})
            for k, v in (("Connection", "X-Up-Hop"), ("X-Up-Hop", "1"), ("Keep-Alive", "timeout=5"),
                         ("Proxy-Authenticate", "Basic"), ("Trailer", "X-Trailer"),
                         ("Upgrade", "h2c"), ("X-Up-End", "kept")):
                resp.headers[k] = v
            return resp
        return web.json_response({"method": seen.method, "raw_path": seen.raw_path,
                                  "query_string": request.query_string,
                                  "headers": seen.headers, "body_length": length})

    async def _stream(self, request: web.BaseRequest, n: int, *, chunked: bool) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if not chunked:
            resp.content_length = n
        await resp.prepare(request)
        block = b"x" * CHUNK
        left = n
        while left > 0:
            n = min(CHUNK, left)
            await resp.write(block[:n])
            self.stream_sent += n
            left -= n
        await resp.write_eof()
        return resp


# Policies --------------------------------------------------------------------------------------
def policy_doc(name: str = "test-api", namespace: str = "default", *,
               tiers: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A RateLimitPolicy: one ``free`` tier of 5 per minute unless ``tiers`` is given; any other
    spec field (``rules``, ``identify``, ``apiKeys``, ``headers``, ``mode``...) passed through."""
    body: dict[str, Any] = {"tiers": tiers or [{"name": "free", "requests": 5, "period": "1m"}]}
    body.update(spec)
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def write_file(path: Path, content: str | dict[str, Any]) -> None:
    """Write atomically (rename) and make sure the mtime differs from the previous file's, so a
    poller comparing mtimes sees the change even on a coarse-timestamp filesystem."""
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    old = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "utf-8")
    st = tmp.stat().st_mtime_ns
    if st <= old:
        os.utime(tmp, ns=(old + 1_000_000, old + 1_000_000))
    tmp.replace(path)


# In-process sidecar ----------------------------------------------------------------------------
@dataclass
class RunningSidecar:
    sidecar: Sidecar
    policy_path: Path
    keys_path: Path | None
    upstream: str
    stopped: bool = field(default=False)

    @property
    def data_port(self) -> int:
        return self.sidecar.data_port

    @property
    def admin_port(self) -> int:
        return self.sidecar.admin_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.data_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.admin_port}"

    def write_policy(self, content: str | dict[str, Any]) -> None:
        write_file(self.policy_path, content)

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.sidecar.stop()


async def start_sidecar(directory: Path, policy: str | dict[str, Any] | None, *,
                        upstream: Upstream | str, keys: dict[str, Any] | None = None,
                        redis: str | None = None, **overrides: Any) -> RunningSidecar:
    """Write ``policy`` (None: no file at all) and ``keys`` (``{key: tier}``) under ``directory``
    and start a sidecar on 127.0.0.1:0 in front of ``upstream``. ``overrides`` are
    :class:`SidecarSettings` fields."""
    policy_path, keys_path = _write_config(directory, policy, keys)
    up = upstream.url if isinstance(upstream, Upstream) else upstream
    settings = SidecarSettings(upstream=up, listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
                               policy_file=str(policy_path),
                               api_keys_file=str(keys_path) if keys_path else None, redis=redis)
    settings = replace(settings, **overrides)
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop()
        raise
    return RunningSidecar(sidecar, policy_path, keys_path, up)


def _write_config(directory: Path, policy: str | dict[str, Any] | None,
                  keys: dict[str, Any] | None) -> tuple[Path, Path | None]:
    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    policy_path = directory / f"policy-{tag}.yaml"
    if policy is not None:
        write_file(policy_path, policy)
    keys_path = None
    if keys is not None:
        keys_path = directory / f"keys-{tag}.yaml"
        write_file(keys_path, {"keys": keys})
    return policy_path, keys_path


# Raw HTTP --------------------------------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, data: bytes, *, timeout: float = 10.0) -> RawResponse | None:
    """Send ``data`` as is to 127.0.0.1:``port`` and read one HTTP/1.x response (None if the
    server closed the connection without answering)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(_read_response(reader, head=data.startswith(b"HEAD ")), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse | None:
    try:
        status_line = await reader.readline()
    except (ConnectionError, OSError):
        return None
    if not status_line:
        return None
    m = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ?(.*)\r\n", status_line)
    if not m:
        raise AssertionError(f"not an HTTP/1.x status line: {status_line!r}")
    headers: list[tuple[str, str]] = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    resp = RawResponse(int(m.group(1)), m.group(2).decode("latin-1"), headers, b"")
    te = (resp.header("Transfer-Encoding") or "").lower()
    cl = resp.header("Content-Length")
    if head or resp.status in (204, 304) or 100 <= resp.status < 200:
        pass  # no body, whatever the headers say
    elif "chunked" in te:
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        resp.body = bytes(body)
    elif cl is not None:
        resp.body = await reader.readexactly(int(cl))
    else:
        resp.body = await reader.read()
    return resp
