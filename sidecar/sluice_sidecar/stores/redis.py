"""Redis decision store: one EVALSHA of ``decide.lua`` per request, pipelined.

Works unchanged on a single Redis, behind Sentinel and on Redis Cluster: every key of one
decision shares a hash tag, so a decision goes to the node owning that tag's slot (the
topology, :mod:`sluice_sidecar.transport.topology`, says which). Errors of any kind surface here
once, as :class:`StoreUnavailable` with the transport's reason.

Every new connection loads the decision script before it carries anything else, so a Redis that
restarted (its script cache empty) never answers ``NOSCRIPT`` to the decisions pipelined on the
connection that replaced the lost one; a batch that still meets ``NOSCRIPT`` (``SCRIPT FLUSH``)
or a cluster redirection goes to :meth:`RedisNodes.execute`, which loads the script or follows
the redirection and sends it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from sluice_core import keyschema, scripts
from sluice_core.gcra import Reply, Resolved
from sluice_core.redisurl import RedisTarget

from sluice_sidecar.stores.base import ResolveAsk, StoreUnavailable
from sluice_sidecar.transport.errors import TIMEOUT, UNAVAILABLE, TransportError
from sluice_sidecar.transport.resp import ConnectionClosed, RedisReplyError, encode, encode_mixed
from sluice_sidecar.transport.topology import RETRYABLE, SLOTS, Addr, RedisNodes, key_slot

PROBE_KEY = f"{keyschema.PREFIX}:probe"  # read by the probe (cost 0), never written; no bucket's name
PROBE_EM_US = 1_000_000


Pending = tuple[tuple[str, ...], int, tuple[int, ...], "asyncio.Future[Any]", ResolveAsk | None]
"""keys, cost, params, the caller's future, and for a "resolve" decision what it asks."""


class RedisStore:
    """Decisions asked for during one event-loop turn go to Redis as one script run (per slot
    on a Cluster), so the script's fixed cost (call, ``TIME``, reply) is paid once per batch;
    batches themselves are pipelined on one connection per node."""

    name = "redis"

    def __init__(self, target: RedisTarget, *, timeout: float, connect_timeout: float,
                 max_batch: int = 64) -> None:
        self.nodes = RedisNodes(target, timeout=timeout, connect_timeout=connect_timeout)
        self._script = scripts.decide()
        self.nodes.preload.append(self._script.source)
        self._sha = self._script.sha1.encode()
        self._cluster = self.nodes.cluster
        self._pending: list[Pending] = []
        self._flush_scheduled = False
        self.max_batch = max_batch
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches = 0  # script runs sent (decisions / batches = mean batch size)
        self.decisions = 0

    async def decide(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending.append((keys, cost, params, fut, None))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    async def resolve(self, ask: ResolveAsk) -> Resolved:
        """Batched with the decisions of the same loop turn (same slot on a Cluster: the
        grant key's, which its buckets share)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Resolved] = loop.create_future()
        self._pending.append((ask.keys, ask.cost, (), fut, ask))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def atomic(self, keys: tuple[str, ...]) -> bool:
        """One script call can take keys of any hash tags, except on a Cluster (one slot)."""
        return not self._cluster or len({key_slot(k) for k in keys}) == 1

    # Batching -------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if self._cluster:
            by_slot: dict[int, list[Pending]] = {}
            for item in pending:
                by_slot.setdefault(key_slot(item[0][0]), []).append(item)
            groups = list(by_slot.values())
        else:
            groups = [pending]
        for group in groups:
            for i in range(0, len(group), self.max_batch):
                self._send(group[i:i + self.max_batch])

    def _payload(self, group: list[Pending]) -> bytes:
        keys: list[str] = []
        argv: list[Any] = [len(group)]  # ints, and for resolve decisions str and Encoded
        mixed = False
        for k, cost, params, _, ask in group:
            keys.extend(k)
            if ask is None:
                argv.append(len(k))
                argv.append(cost)
                argv.extend(params)
            else:
                mixed = True
                argv.extend(("r", cost, len(ask.rule_keys), *ask.rule_params, len(ask.fallback_keys),
                             *ask.fallback_params, ask.tiers))
        if mixed:
            return encode_mixed(b"EVALSHA", self._sha, len(keys), *keys, *argv)
        return encode(b"EVALSHA", self._sha, len(keys), *keys, *argv)

    def _send(self, group: list[Pending]) -> None:
        group = [g for g in group if not g[3].done()]  # callers that went away
        if not group:
            return
        self.batches += 1
        self.decisions += len(group)
        payload = self._payload(group)
        conn = self.nodes.ready_for(group[0][0][0])
        if conn is not None and not conn.closed:
            conn.send(payload).add_done_callback(lambda f: self._sent(group, payload, f))
        else:
            self._spawn(self._send_slowly(group, payload))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def _sent(self, group: list[Pending], payload: bytes, f: asyncio.Future[Any]) -> None:
        exc = f.exception() if not f.cancelled() else ConnectionClosed("cancelled")
        if exc is None:
            self._distribute(group, f.result())
        elif isinstance(exc, RedisReplyError) and str(exc).startswith(RETRYABLE):
            # A batch that met an error reply a second try cures goes the careful path: e.g.
            # every batch pipelined behind the first NOSCRIPT met it too, and each is sent
            # again (after the script is loaded), none failed.
            self._spawn(self._send_slowly(group, payload))
        else:
            self._fail(group, exc)

    async def _send_slowly(self, group: list[Pending], payload: bytes) -> None:
        try:
            reply = await self.nodes.execute(payload, group[0][0][0], reload=self._script.source)
        except BaseException as exc:  # every caller must hear back, whatever happened
            self._fail(group, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._distribute(group, reply)

    @staticmethod
    def _distribute(group: list[Pending], reply: list[Any]) -> None:
        at = 0
        for keys, _, _, fut, ask in group:
            if ask is not None:
                at = _resolved(ask, reply, at, fut)
                continue
            n = len(keys)
            if not fut.done():
                fut.set_result(Reply(reply[at] == 1, reply[at + 1:at + 1 + n]))
            at += 1 + n

    def _fail(self, group: list[Pending], exc: BaseException) -> None:
        err = self._wrap(exc)
        for _, _, _, fut, _ in group:
            if not fut.done():
                fut.set_exception(err)

    def _wrap(self, exc: BaseException) -> StoreUnavailable:
        """Every failure leaves the store as one StoreUnavailable (the cause kept too). Its
        text is the breaker's ERROR line: Redis's own words for an error reply; the
        topology's sentence as it stands (it says what happened: "redis refused the
        connection: WRONGPASS ...", "no sentinel knows master ..."); a lost or silent
        connection, or anything else, as "redis unavailable: ..."."""
        reason = exc.reason if isinstance(exc, TransportError) else UNAVAILABLE
        if reason in (TIMEOUT, UNAVAILABLE):
            self.nodes.rediscover()
        if isinstance(exc, RedisReplyError):
            # Redis's own words: they name the condition (WRONGPASS, OOM ...), never a secret.
            err = StoreUnavailable(f"redis refused: {str(exc)[:120]}", reason)
        elif isinstance(exc, TransportError) and reason != TIMEOUT and not isinstance(exc, ConnectionClosed):
            err = StoreUnavailable(str(exc), reason)
        else:
            err = StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}", reason)
        err.__cause__ = exc
        return err

    async def probe(self) -> None:
        """Can decisions go through now? Do what a decision does, under the decision timeout:
        on every node decisions go to, connect (authenticate; a new connection loads the
        decision script) and run the script once, reading one bucket (cost 0: nothing is
        written). A Redis that answers, but slower than ``--redis-timeout-ms``, fails the probe
        as it fails decisions, so the breaker stays open instead of closing for requests that
        would time out. The circuit breaker calls this while open, and once at start."""
        try:
            if self._cluster:
                await self.nodes.refresh_slots()
                addrs = self.nodes.addresses()
            else:
                addrs = [await self.nodes.primary()]
            for addr in addrs:
                key = self._probe_key(addr)  # on addr: the decision goes there
                payload = encode(b"EVALSHA", self._sha, 1, key, 1, 1, 0, PROBE_EM_US, PROBE_EM_US)
                await self.nodes.execute(payload, key, reload=self._script.source)
        except TransportError as exc:
            raise self._wrap(exc)  # noqa: B904 - the cause is kept in __cause__

    def _probe_key(self, addr: Addr) -> str:
        """A key no bucket uses, on ``addr``'s slots (Cluster: the first hash tag found there)."""
        if not self._cluster:
            return PROBE_KEY
        for i in range(SLOTS * 8):
            key = f"{{{PROBE_KEY}-{i}}}"
            if self.nodes.node_for_slot(key_slot(key)) == addr:
                return key
        return PROBE_KEY  # pragma: no cover - every master in the slot map owns a slot

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their callers have heard back
        await self.nodes.close()


def _resolved(ask: ResolveAsk, reply: list[Any], at: int, fut: asyncio.Future[Any]) -> int:
    """Hand a "resolve" decision's share of the script's reply (from ``at``) to its caller;
    returns where the next decision's share starts."""
    value = reply[at]
    at += 1
    # A known key decided its own bucket and its rules; an unknown one its fallback buckets.
    n = 1 + len(ask.rule_keys) if value else len(ask.fallback_keys)
    decided = Reply(reply[at] == 1, reply[at + 1:at + 1 + n]) if n else None
    if not fut.done():
        fut.set_result(Resolved(value.decode("utf-8", "replace") if value else None, decided))
    return at + 1 + n if n else at
