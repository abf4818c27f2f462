"""Near-limit alerts POSTed to a policy's ``spec.alerts[].webhook.url``, off the pipeline.

A webhook URL is written by whoever may edit a policy, and the collector POSTs from inside the
cluster: that is a server-side request forgery tool unless bounded. So:

* addresses are checked after resolution, on every connection (a resolver that filters, so a
  name that resolves to a forbidden address later, DNS rebinding, is refused too): never
  loopback (the collector's own API, a node-local agent), link-local (cloud metadata services at
  169.254.169.254), multicast, unspecified or reserved addresses; ``--alert-webhooks-to-loopback``
  lets loopback through (a relay on the same host, the tests);
* redirects are not followed, the response body is not read beyond its status, each attempt has
  a timeout, and the queue is bounded: a slow or dead receiver costs dropped alerts (counted),
  never the collector's memory or its pipeline;
* the body is signed when the collector has a secret (``X-Sluice-Signature: sha256=<hex
  HMAC-SHA256 of the body>``), so a receiver can tell a real alert from a forged one: the URL is
  no secret (it sits in the policy and the config document);
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

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from sluice_analytics.metrics import AnalyticsMetrics
from sluice_analytics.nearlimit import Crossing

log = logging.getLogger("sluice.analytics")
QUEUE = 1000  # alerts waiting for delivery at most; one more is dropped (counted)
BACKOFF_S = 1.0  # before the second attempt; doubled before each next one


class AddressRefused(OSError):
    """The webhook's host resolves only to addresses the collector must not call."""


def refused(address: str, *, to_loopback: bool) -> str | None:
    """Why the collector must not call ``address`` (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if to_loopback else "loopback"
    for reason, bad in (("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                        ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved)):
        if bad:
            return reason
    return None


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses :func:`refused` allows."""

    def __init__(self, *, to_loopback: bool) -> None:
        self._inner = DefaultResolver()
        self._to_loopback = to_loopback

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if refused(r["host"], to_loopback=self._to_loopback) is None]
        if not kept:
            reasons = sorted({refused(r["host"], to_loopback=self._to_loopback) or "" for r in found})
            raise AddressRefused(f"{host} resolves only to {', '.join(reasons)} addresses")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def shown(url: str) -> str:
    """A webhook as the log names it: scheme and host, never the path or query."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class WebhookSender:
    def __init__(self, metrics: AnalyticsMetrics, *, timeout_s: float, attempts: int,
                 secret: bytes | None, to_loopback: bool, backoff_s: float = BACKOFF_S) -> None:
        self.metrics, self.backoff_s = metrics, backoff_s
        self.timeout_s, self.attempts, self.secret, self.to_loopback = timeout_s, attempts, secret, to_loopback
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE)

    async def deliver(self, crossing: Crossing) -> None:
        """Queue the alert for its webhook, if the alert has one; never waits."""
        if not crossing.alert.webhook:
            return
        body = json.dumps(crossing.body(), separators=(",", ":"), sort_keys=True).encode()
        try:
            self.queue.put_nowait((crossing.alert.webhook, body))
        except asyncio.QueueFull:
            self.metrics.webhooks.labels("dropped").inc()
            log.warning("near-limit webhook queue full (%d): alert to %s dropped", QUEUE, shown(crossing.alert.webhook))

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver queued alerts one at a time until ``stop``."""
        resolver = GuardedResolver(to_loopback=self.to_loopback)
        connector = aiohttp.TCPConnector(resolver=resolver, limit=4, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop.is_set():
                got = asyncio.ensure_future(self.queue.get())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({got, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not got.done():
                    got.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await got
                    break
                url, body = got.result()
                await self.send(session, url, body, stop)

    async def send(self, session: aiohttp.ClientSession, url: str, body: bytes, stop: asyncio.Event) -> bool:
        """POST ``body`` to ``url`` with retries; True once a receiver answered 2xx."""
        headers = {"Content-Type": "application/json", "User-Agent": "sluice-analytics"}
        if self.secret:
            headers["X-Sluice-Signature"] = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        host = urllib.parse.urlsplit(url).hostname or ""
        literal = _literal_ip(host)
        if literal is not None and (why := refused(literal, to_loopback=self.to_loopback)):
            return self._failed(url, "refused", f"{why} address")
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
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason, detail = "failed", f"{type(exc).__name__}: {exc}"[:200]
        return self._failed(url, reason, detail)

    def _failed(self, url: str, reason: str, detail: str) -> bool:
        detail = detail.replace(url, shown(url))  # an error that quotes the URL: not its path
        self.metrics.webhooks.labels(reason).inc()
        log.warning("near-limit webhook %s not delivered (%s): %s", shown(url), reason, detail)
        return False


def _literal_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None
