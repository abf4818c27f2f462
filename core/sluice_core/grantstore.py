"""Many API-key grants at once (``sluice apply --api-keys-file``): pipelined writes and
revocations in batches of a fixed size, so memory does not grow with the number of keys, on a
single Redis, Sentinel and a Redis Cluster alike.

Every write keeps the policy's grant index (:func:`~sluice_core.keyschema.grant_index_key`) a
superset of its grants: a batch's index entries are added before its grants are written, and
removed after its grants are deleted. A run cut short therefore leaves at most index entries
without a grant (the next run prunes them), never a grant the index does not list, which no
re-apply could revoke. Grants have no TTL (``write_grant.lua`` says why).

Each batch is announced as soon as it is written (:func:`announce`), from what it changed
(``SET … GET`` returns the value it replaced; a revocation changes every key it removes from
the index, with a grant or not: a retry after a failure between the two must still announce):
a notice per changed key up to :data:`NOTICE_LIMIT`, so a re-apply that changes one key drops
one key from the sidecars' caches, and beyond it one ``"<policy id> *"``, where a notice per
key would wake every sidecar once per key. A change reaches the sidecars a batch after it is
written, not at the end of a run of a million keys. A batch that fails part-way is announced
as ``"<policy id> *"`` (best effort: what it changed is unknown). A Cluster pipeline cannot
carry PUBLISH, so the notices are a call of their own. One key's change stays
:func:`sluice_core.configstore.put_grant`: O(1) writes and one notice.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio

from sluice_core import keyschema, scripts
from sluice_core.configstore import REDIS_FAILURES, Client, ConfigStoreError

BATCH = 1000
"""Keys per pipeline: big enough that round trips do not dominate (1,000 grants are ~100 kB on
the wire), small enough that a batch's replies and buffers stay a few hundred kB."""

NOTICE_LIMIT = 100
"""Up to this many changed keys, one notice each; more, one notice for the whole policy."""

T = TypeVar("T")


@dataclass
class Changes:
    """What a bulk write or revocation changed: how many keys, and the first of them (no more
    than it takes to tell "a few" from "many": memory stays bounded)."""

    count: int = 0
    some: list[str] = field(default_factory=list)

    def add(self, client_id: str) -> None:
        self.count += 1
        if len(self.some) <= NOTICE_LIMIT:
            self.some.append(client_id)

    def merge(self, other: Changes) -> None:
        self.count += other.count
        self.some.extend(other.some[:NOTICE_LIMIT + 1 - len(self.some)])


@dataclass(frozen=True, slots=True)
class GrantWrite:
    """One grant as the bulk writer sends it: already encoded (:func:`sluice_core.grants.encode`)."""

    client_id: str  # keyschema.client_for_api_key of the key's digest
    value: str
    expires_ms: int = 0


def chunks(items: Iterable[T], size: int = BATCH) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _pipeline(client: Client) -> Any:
    r = client.redis
    # A Cluster pipeline groups commands by node (never a transaction); a single node's is sent
    # as it is, in order, without MULTI.
    return r.pipeline() if isinstance(r, redis.asyncio.RedisCluster) else r.pipeline(transaction=False)


Hook = Callable[[], Awaitable[None]]
"""Called before each batch (``sluice apply`` renews its lease there, and stops when lost)."""


async def write(client: Client, policy_ref: str, items: Iterable[GrantWrite], changes: Changes | None = None, *,
                batch: int = BATCH, before_batch: Hook | None = None) -> int:
    """Write these grants (and their index entries), ``batch`` at a time, and announce each
    batch's changed keys; return how many, and add to ``changes`` the keys whose grant is new
    or differs."""
    pid = keyschema.policy_id(policy_ref)
    index = keyschema.grant_index_key(pid)
    n = 0
    async with _announced_on_failure(client, policy_ref, "write", lambda: n):
        for chunk in chunks(items, batch):
            if before_batch is not None:
                await before_batch()
            await client.redis.sadd(index, *(g.client_id for g in chunk))  # the index first
            pipe = _pipeline(client)
            for g in chunk:
                pipe.set(keyschema.grant_key(pid, g.client_id), g.value, get=True)
            replaced = await pipe.execute()
            n += len(chunk)
            done = Changes()
            for g, old in zip(chunk, replaced, strict=True):
                if old is None or _text(old) != g.value:
                    done.add(g.client_id)
            await _announce_batch(client, policy_ref, done, changes)
    return n


async def revoke(client: Client, policy_ref: str, client_ids: Iterable[str], changes: Changes | None = None, *,
                 batch: int = BATCH) -> int:
    """Remove these keys' grants (then their index entries), ``batch`` at a time, and announce
    each batch's changed keys; return how many, and add to ``changes`` the keys that had a grant
    or an index entry."""
    pid = keyschema.policy_id(policy_ref)
    index = keyschema.grant_index_key(pid)
    n = 0
    async with _announced_on_failure(client, policy_ref, "revoke", lambda: n):
        for chunk in chunks(client_ids, batch):
            listed = await client.redis.smismember(index, chunk)
            pipe = _pipeline(client)
            for cid in chunk:
                pipe.delete(keyschema.grant_key(pid, cid))
            deleted = await pipe.execute()
            await client.redis.srem(index, *chunk)  # the grants are gone: now the index entries
            n += len(chunk)
            done = Changes()
            for cid, there, had in zip(chunk, deleted, listed, strict=True):
                if there or had:
                    done.add(cid)
            await _announce_batch(client, policy_ref, done, changes)
    return n


@contextlib.asynccontextmanager
async def _announced_on_failure(client: Client, policy_ref: str, what: str,
                                done: Callable[[], int]) -> AsyncIterator[None]:
    """A batch that fails part-way changed an unknown part of its keys: tell the sidecars to
    drop all they cached of the policy (best effort; the failure is what the caller hears)."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(ConfigStoreError):
            await announce(client, policy_ref)
        if isinstance(exc, REDIS_FAILURES):
            raise ConfigStoreError(f"cannot {what} API key grants of policy {policy_ref!r} "
                                   f"({done()} done): {exc}") from exc
        raise


async def _announce_batch(client: Client, policy_ref: str, done: Changes, changes: Changes | None) -> None:
    await announce(client, policy_ref, done)
    if changes is not None:
        changes.merge(done)


async def announce(client: Client, policy_ref: str, changes: Changes | None = None) -> int:
    """Tell the sidecars which of the policy's grants changed: one notice per key of
    ``changes`` up to :data:`NOTICE_LIMIT`, else (or without ``changes``) one
    ``"<policy id> *"``: they drop what they cached of those keys, or of all the policy's.
    Sent from the node of the policy's index (``announce_keys.lua``), so they arrive in order.
    Returns how many notices went out."""
    pid = keyschema.policy_id(policy_ref)
    if changes is not None and changes.count == 0:
        return 0
    if changes is not None and changes.count <= NOTICE_LIMIT:
        notices = [keyschema.keys_notice(pid, cid) for cid in changes.some]
    else:
        notices = [keyschema.keys_notice(pid)]
    s = scripts.announce_keys()
    try:
        await client.redis.eval(s.source, 1, keyschema.grant_index_key(pid), keyschema.KEYS_CHANNEL, *notices)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot announce the API key grants of policy {policy_ref!r}: {exc}") from exc
    return len(notices)


async def count(client: Client, policy_ref: str) -> int:
    """How many keys the policy's index lists (every granted key, and briefly a few whose
    grant is gone: see the module docstring)."""
    try:
        return int(await client.redis.scard(keyschema.grant_index_key(keyschema.policy_id(policy_ref))))
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot count the API keys of policy {policy_ref!r}: {exc}") from exc


async def pages(client: Client, policy_ref: str, *, batch: int = BATCH) -> AsyncIterator[list[str]]:
    """The client ids the policy's index lists, a page (about ``batch``) at a time (SSCAN: an id
    present throughout is listed at least once; one removed meanwhile may be, or not)."""
    index = keyschema.grant_index_key(keyschema.policy_id(policy_ref))
    cursor: int = 0
    while True:
        try:
            cursor, found = await client.redis.sscan(index, cursor, count=batch)
        except REDIS_FAILURES as exc:
            raise ConfigStoreError(f"cannot list the API keys of policy {policy_ref!r}: {exc}") from exc
        if found:
            yield [_text(m) for m in found]
        if int(cursor) == 0:
            return


def _text(member: bytes | str) -> str:
    return member.decode() if isinstance(member, bytes) else member
