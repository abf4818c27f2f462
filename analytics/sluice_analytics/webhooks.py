"""Near-limit alerts POSTed to a policy's ``spec.alerts[].webhook``, off the pipeline: its ``url``,
or the URL in the Secret its ``secretRef`` names (:mod:`sluice_analytics.webhooksecrets`, read
when the alert is sent, and guarded like any other URL).

A webhook URL is written by whoever may edit a policy, and the collector POSTs from inside the
cluster: that is a server-side request forgery tool unless bounded. So:

* only globally routable addresses are called by default: every private, shared (100.64/10,
  where some clouds serve metadata), loopback, link-local (169.254.169.254), unique-local
  (fd00:ec2::254), multicast, reserved or documentation address is refused, after unwrapping
  the IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo). Receivers inside
  the cluster or on a private network are named by ``--alert-webhook-allow`` CIDRs. Addresses
  are checked after resolution, on every connection (a resolver that filters), so a name that
  resolves to a forbidden address, later too (DNS rebinding), is refused;
* redirects are not followed, the response body is not read beyond its status, each attempt has
  a timeout, and the queues are bounded: a slow or dead receiver costs its own alerts (dropped,
  counted), never another receiver's, the collector's memory or its pipeline. Alerts queue per
  receiving host (per Secret for a ``secretRef``: its host is not known before it is read),
  queues are served in turn, at most one request per queue at a time and :data:`WORKERS` at once;
* the body is signed when the collector has a secret (``X-Sluice-Signature: sha256=<hex
  HMAC-SHA256 of the body>``), so a receiver can tell a real alert from a forged one: a ``url``
  is no secret (it sits in the policy and the config document), a ``secretRef``'s URL may be;
* the log names a webhook by scheme and host only: a path may carry a token (a chat service's
  incoming-webhook URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from sluice_core.model import SecretKeyRef

from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import Crossing
from sluice_analytics.settings import IPNetwork, parse_allow
from sluice_analytics.webhooksecrets import SecretUnavailable, WebhookSecrets

log = logging.getLogger("sluice.analytics")
QUEUE = 1000  # alerts waiting for delivery at most, all hosts; one more is dropped (counted)
PER_HOST = 100  # ... and per receiving host, so one host's backlog leaves room for the others
WORKERS = 4  # requests in flight at most (one per host)
BACKOFF_S = 1.0  # before the second attempt; doubled before each next one
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Target = str | tuple[str, SecretKeyRef]  # a URL, or (namespace, ref) of a Secret holding one
__all__ = ["AddressRefused", "QueuedDelivery", "WebhookSender", "parse_allow", "refused"]


class AddressRefused(OSError):
    """The webhook's host resolves only to addresses the collector must not call."""


def embedded(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and the IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo)."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if any(ip in net for net in NAT64):
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def refused(address: str, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why the collector must not call ``address`` (None: it may): an address is called when it
    is in an ``allow`` network, or when it and every address it carries are globally routable."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    forms = embedded(ip)
    if any(f in net for f in forms for net in allow if f.version == net.version):
        return None
    for f in forms:
        if not f.is_global:
            return f"{f} is not globally routable (allow it with --alert-webhook-allow)"
    return None


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses :func:`refused` allows."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        self._inner = DefaultResolver()
        self._allow = tuple(allow)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if refused(r["host"], self._allow) is None]
        if not kept:
            reasons = sorted({refused(r["host"], self._allow) or "" for r in found})
            raise AddressRefused(f"{host}: {'; '.join(reasons)}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def shown(url: str) -> str:
    """A webhook as the log names it: scheme and host, never the path or query."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def shown_target(target: Target) -> str:
    return shown(target) if isinstance(target, str) else WebhookSecrets.shown(*target)


class WebhookSender:
    def __init__(self, metrics: AnalyticsMetrics, *, timeout_s: float, attempts: int,
                 secret: bytes | None, allow: Sequence[IPNetwork] = (), backoff_s: float = BACKOFF_S,
                 secrets: WebhookSecrets | None = None) -> None:
        self.metrics, self.backoff_s = metrics, backoff_s
        self.timeout_s, self.attempts, self.secret, self.allow = timeout_s, attempts, secret, tuple(allow)
        self.secrets = secrets or WebhookSecrets(None, "")
        self._queues: dict[str, deque[tuple[Target, bytes]]] = {}  # host -> its alerts, oldest first
        self._ready: deque[str] = deque()  # hosts with alerts and no request in flight, in turn
        self._queued = 0
        self._wake = asyncio.Event()

    async def deliver(self, crossing: Crossing) -> None:
        """Queue the alert for its webhook, if the alert has one; never waits."""
        webhook = crossing.alert.webhook
        target: Target
        if webhook is not None and webhook.secret_ref is not None:
            target = (self.secrets.namespace_of(crossing.namespace), webhook.secret_ref)
            host = "secret " + shown_target(target)  # not a host name: cannot clash with one
        elif webhook is not None and webhook.url:
            target = webhook.url
            host = (urllib.parse.urlsplit(target).hostname or "").lower()
        else:
            return
        queue = self._queues.setdefault(host, deque())
        if self._queued >= QUEUE or len(queue) >= PER_HOST:
            self.metrics.webhooks.labels("dropped").inc()
            log.warning("near-limit webhook queue full (%s): alert to %s dropped",
                        "all hosts" if self._queued >= QUEUE else "this host", shown_target(target))
            return
        body = json.dumps(crossing.body(), separators=(",", ":"), sort_keys=True).encode()
        if not queue and host not in self._ready:
            self._ready.append(host)
        queue.append((target, body))
        self._queued += 1
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver queued alerts until ``stop``: hosts in turn, one request per host at a time."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow), limit=WORKERS, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [asyncio.create_task(self._work(session, stop)) for _ in range(WORKERS)]
            await stop.wait()
            self._wake.set()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _work(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            host = self._ready.popleft()  # busy until its request is done: out of the turn
            target, body = self._queues[host].popleft()
            self._queued -= 1
            try:
                url = await self.url(target)
                if url is not None:
                    await self.send(session, url, body, stop)
            except Exception:  # a bug must not end a worker: said, the next alert is taken
                log.exception("near-limit webhook to %s failed", shown_target(target))
            if self._queues[host]:
                self._ready.append(host)
                self._wake.set()
            else:
                del self._queues[host]

    async def url(self, target: Target) -> str | None:
        """The URL to POST to: ``target`` itself, or read from its Secret (None: could not be,
        counted as ``secret`` and logged by the Secret's name, never its value)."""
        if isinstance(target, str):
            return target
        try:
            return await self.secrets.url(*target)
        except SecretUnavailable as exc:
            self.metrics.webhooks.labels("secret").inc()
            log.warning("near-limit webhook from %s not delivered (secret): %s", shown_target(target), exc)
            return None

    async def send(self, session: aiohttp.ClientSession, url: str, body: bytes, stop: asyncio.Event) -> bool:
        """POST ``body`` to ``url`` with retries; True once a receiver answered 2xx."""
        headers = {"Content-Type": "application/json", "User-Agent": "sluice-analytics"}
        if self.secret:
            headers["X-Sluice-Signature"] = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        host = urllib.parse.urlsplit(url).hostname or ""
        literal = _literal_ip(host)
        if literal is not None and (why := refused(literal, self.allow)):
            return self._failed(url, "refused", why)
        delay, reason, detail = self.backoff_s, "failed", ""
        for attempt in range(self.attempts):
            if attempt:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
                delay *= 2
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout_s)
                async with session.post(url, data=body, headers=headers, timeout=timeout,
                                        allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        self.metrics.webhooks.labels("delivered").inc()
                        return True
                    reason, detail = "status", f"answered {resp.status}"
                    if resp.status < 500 and resp.status != 429:
                        break  # the receiver refuses this alert: asking again will not help
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, AddressRefused):  # the resolver's verdict, wrapped
                    return self._failed(url, "refused", str(exc.os_error))
                reason, detail = "failed", f"{type(exc).__name__}: {exc}"[:200]
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                reason, detail = "failed", f"{type(exc).__name__}: {exc}"[:200]
        return self._failed(url, reason, detail)

    def _failed(self, url: str, reason: str, detail: str) -> bool:
        detail = detail.replace(url, shown(url))  # an error that quotes the URL: not its path
        self.metrics.webhooks.labels(reason).inc()
        log.warning("near-limit webhook %s not delivered (%s): %s", shown(url), reason, detail)
        return False


class QueuedDelivery:
    """Another deliverer (the Kubernetes Event) off the detection pass: a bounded queue and
    one worker, so a slow API server never holds detection up. ``what`` names it in the
    ``dropped`` count and the log."""

    def __init__(self, send: Callable[[Crossing], Awaitable[None]], metrics: AnalyticsMetrics, what: str) -> None:
        self.send, self.metrics, self.what = send, metrics, what
        self.queue: asyncio.Queue[Crossing] = asyncio.Queue(QUEUE)

    async def deliver(self, crossing: Crossing) -> None:
        try:
            self.queue.put_nowait(crossing)
        except asyncio.QueueFull:
            self.metrics.near_limit_dropped.labels(self.what).inc()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            got = asyncio.ensure_future(self.queue.get())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({got, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not got.done():
                got.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await got
                return
            try:
                await self.send(got.result())
            except Exception:  # said; the next one is taken
                log.exception("near-limit %s not delivered", self.what)


def _literal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None
