"""Key Secrets as Redis grants: one Secret's change is one grant written or revoked (O(1) Redis
writes, one change notice), whatever the number of keys; a policy's change judges that policy's
Secrets again (O(its keys) here, Redis writes only for the keys it changed).

What is kept per Secret whose grant is in Redis: :class:`Granted` (which policy, the key's
SHA-256, a fingerprint of the value written, its expiry) and the Secret's entry in its policy's
owners (digest -> Secret). Never the key, never the Secret's data: what a grant needs comes from
the :class:`~sluice_operator.keysecrets.SecretKey` records kopf's index holds (handlers.py).

A policy's first judgement after the operator started, or after Redis lost what was written
(:meth:`KeyGrants.forget_synced`), makes Redis match the Secrets: every current grant written and
every grant in the policy's index that no Secret backs revoked, under the policy's keys lease
(:mod:`sluice_core.keysapply`, the machinery of ``sluice apply``: a concurrent run of it fails
fast instead of interleaving). Until then single Secret events write nothing for that policy:
its first judgement writes them all, from a complete listing. A judgement reads the Secrets
under the scope's lock, which every event takes too: an event either is in what it read, or
waits for it and applies to what it wrote."""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from sluice_core import configstore, grants, grantstore, keysapply, keyschema
from sluice_core.model import CompiledPolicy

from sluice_operator.keysecrets import KeyProblem, SecretKey, judge

log = logging.getLogger("sluice.operator")


@dataclass(frozen=True, slots=True)
class Granted:
    """What Redis holds for one Secret: its grant under ``policy``."""

    policy: str
    digest: bytes
    value: int  # hash of the encoded grant: an event that changes nothing writes nothing
    expires_ms: int


def policy_ref(scope: str, policy: str) -> str:
    """:attr:`CompiledPolicy.ref` of a policy known by name only (it may be gone)."""
    return f"{scope}/{policy}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


ReadBack = Callable[[], Awaitable[bool]]
"""Does Redis still hold what a write just made (read after it is counted)?"""
Counter = Callable[[ReadBack | None], Awaitable[None]]
"""Counts one grant write in Redis (:meth:`Reconciler.count_write`), with its read-back if any."""


async def _uncounted(_check: ReadBack | None) -> None:
    return None


class KeyGrants:
    """Per scope (a namespace, or ``_cluster``): which Secrets' grants are in Redis, the
    Secrets that cannot be used (for the status), and when the first grant expires."""

    def __init__(self, client: configstore.Client) -> None:
        self.redis = client
        self._granted: dict[str, dict[str, Granted]] = {}  # scope -> key id -> its grant in Redis
        self._owners: dict[tuple[str, str], dict[bytes, str]] = {}  # (scope, policy) -> digest -> key id
        self._problems: dict[str, dict[str, tuple[str, str]]] = {}  # scope -> key id -> (policy, reason)
        self._synced: dict[tuple[str, str], frozenset[str]] = {}  # (scope, policy) -> tiers judged with
        self._judged_with: dict[tuple[str, str], CompiledPolicy] = {}  # (scope, policy) -> its version judged
        # scope -> key id -> record of a Secret refused for holding a key another Secret of its
        # policy holds: the first of them takes the key over when that Secret lets it go.
        self._dups: dict[str, dict[str, SecretKey]] = {}
        self._expiries: dict[str, list[tuple[int, str]]] = {}  # scope -> heap of (expires ms, key id)
        self._locks: dict[str, asyncio.Lock] = {}
        # Every grant write and revocation is counted with the config writes (reconcile.py sets
        # it): a Redis that lost one (a failover, an older snapshot) is noticed as for a document.
        self.counted: Counter = _uncounted

    # -- what the status shows -----------------------------------------------------------------

    def count(self, scope: str, policy: str) -> int:
        return len(self._owners.get((scope, policy), {}))

    def problems(self, scope: str, policy: str) -> list[KeyProblem]:
        found = self._problems.get(scope, {})
        return sorted((KeyProblem(key_id.split("/", 1)[-1], reason)
                       for key_id, (p, reason) in found.items() if p == policy), key=lambda k: k.secret)

    def next_expiry(self, scope: str) -> dt.datetime | None:
        """When the scope's first grant expires (then its policies are judged again)."""
        first = self._first_expiry(scope)
        return dt.datetime.fromtimestamp(first / 1000, dt.UTC) if first else None

    def _first_expiry(self, scope: str) -> int:
        heap = self._expiries.get(scope)
        granted = self._granted.get(scope, {})
        while heap:
            at, key_id = heap[0]
            g = granted.get(key_id)
            if g is not None and g.expires_ms == at:
                return at
            heapq.heappop(heap)  # revoked or changed since: stale
        return 0

    def judged(self, scope: str, policy: str) -> bool:
        """Have the policy's keys been judged in full since the start (or the last loss)?"""
        return (scope, policy) in self._synced

    def with_keys(self) -> list[tuple[str, str]]:
        """(scope, policy) of every policy with grants written here: its key index must exist."""
        return [k for k, owners in self._owners.items() if owners]

    def knows(self, scope: str, key_id: str) -> bool:
        """Has the Secret a grant in Redis, or a problem shown, here?"""
        return key_id in self._granted.get(scope, {}) or key_id in self._problems.get(scope, {})

    # -- Redis lost it, or the operator started ------------------------------------------------

    def forget_synced(self) -> None:
        """Redis may no longer hold what was written: the next judgement of every policy makes
        Redis match its Secrets again (a full one)."""
        self._synced.clear()

    def unsync(self, scope: str) -> None:
        """A write of the scope failed: its policies' next judgement is a full one."""
        for key in [k for k in self._synced if k[0] == scope]:
            del self._synced[key]

    def forget(self, scope: str) -> None:
        for kept in (self._granted, self._problems, self._expiries, self._dups):
            kept.pop(scope, None)
        for key in [k for k in (*self._owners, *self._synced, *self._judged_with) if k[0] == scope]:
            self._owners.pop(key, None)
            self._synced.pop(key, None)
            self._judged_with.pop(key, None)

    # -- one Secret ------------------------------------------------------------------------------

    async def secret_changed(self, scope: str, key_id: str, key: SecretKey | None,
                             live: Mapping[str, CompiledPolicy]) -> set[str]:
        """A Secret was created, changed, relabelled or deleted (``key`` None): write or revoke
        its grant. Returns the policies whose keys or key problems changed (none: the event
        changed nothing, as for a Secret reported again after a watch gap).

        Under the scope's lock, as a policy's judgement (:meth:`sync_policy`), which reads the
        Secrets under it: an event that lands while a judgement runs is applied after it, to
        what it wrote (a judgement's older listing never wins over a later event)."""
        async with self._locks.setdefault(scope, asyncio.Lock()):
            touched: set[str] = set()
            problems = self._problems.setdefault(scope, {})
            before = problems.pop(key_id, None)
            self._dups.get(scope, {}).pop(key_id, None)
            want = self._judge(scope, key, live.get(key.policy) if key else None, _now_ms())
            after = problems.get(key_id)
            touched.update(entry[0] for entry in (before, after) if entry is not None and before != after)
            old = self._granted.get(scope, {}).get(key_id)
            if old is not None and (want is None or key is None or (old.policy, old.digest) != (key.policy, key.digest)):
                await self._release(scope, key_id, old, live.get(old.policy))
                touched.add(old.policy)
                old = None
            if want is not None and key is not None and key.digest is not None:
                if (scope, key.policy) not in self._synced:
                    return touched  # its policy's first judgement writes it, with all its keys
                ref = policy_ref(scope, key.policy)
                value = hash(grants.encode(want, ref))
                if old is None or old.value != value:
                    await configstore.put_grant(self.redis, ref, key.digest, want)
                    written, encoded = key.digest, grants.encode(want, ref)
                    await self.counted(lambda: configstore.grant_is(self.redis, ref, written, encoded))
                    self._note(scope, key_id, Granted(key.policy, key.digest, value, want.expires_ms))
                    touched.add(key.policy)
            return touched

    def _judge(self, scope: str, key: SecretKey | None, policy: CompiledPolicy | None,
               now_ms: int) -> grants.StoredGrant | None:
        """The grant ``key`` should have (noting why not, for the status)."""
        if key is None or policy is None:
            return None
        want, problem = judge(key, policy, now_ms)
        if want is not None and key.digest is not None:
            owner = self._owners.get((scope, key.policy), {}).get(key.digest)
            if owner is not None and owner != key.key_id:
                want, problem = None, _same_key(owner)
                self._dups.setdefault(scope, {})[key.key_id] = key
        if problem:
            self._problems.setdefault(scope, {})[key.key_id] = (key.policy, problem)
        return want

    async def _release(self, scope: str, key_id: str, old: Granted, policy: CompiledPolicy | None) -> None:
        """``key_id`` no longer holds ``old``: the next Secret of the policy with the same key
        (a duplicate refused so far) takes the grant over, written over it (no moment without
        it); none: revoked."""
        policy = policy or self._judged_with.get((scope, old.policy))
        heir = self._heir(scope, old, policy) if (scope, old.policy) in self._synced and policy else None
        ref = policy_ref(scope, old.policy)
        if heir is None:
            await configstore.revoke_grant(self.redis, ref, old.digest)
            await self.counted(lambda: configstore.grant_is(self.redis, ref, old.digest, None))
            self._drop(scope, key_id, old)
            return
        await configstore.put_grant(self.redis, ref, old.digest, heir[1])
        encoded = grants.encode(heir[1], ref)
        await self.counted(lambda: configstore.grant_is(self.redis, ref, old.digest, encoded))
        self._drop(scope, key_id, old)
        self._dups[scope].pop(heir[0], None)
        self._problems.setdefault(scope, {}).pop(heir[0], None)
        self._note(scope, heir[0], Granted(old.policy, old.digest, hash(grants.encode(heir[1], ref)), heir[1].expires_ms))
        for other, record in self._dups[scope].items():  # the others now name their new holder
            if (record.policy, record.digest) == (old.policy, old.digest):
                self._problems[scope][other] = (old.policy, _same_key(heir[0]))

    def _heir(self, scope: str, old: Granted, policy: CompiledPolicy) -> tuple[str, grants.StoredGrant] | None:
        """The first refused duplicate of ``old``'s key that can hold it now, and its grant;
        those that no longer can (expired, changed) are no longer duplicates."""
        dups = self._dups.get(scope, {})
        problems = self._problems.setdefault(scope, {})
        now = _now_ms()
        for key_id, record in list(dups.items()):
            if (record.policy, record.digest) != (old.policy, old.digest):
                continue
            want, problem = judge(record, policy, now)
            if want is not None:
                return key_id, want
            del dups[key_id]
            if problem:
                problems[key_id] = (record.policy, problem)
            else:
                problems.pop(key_id, None)
        return None

    def _note(self, scope: str, key_id: str, g: Granted) -> None:
        self._granted.setdefault(scope, {})[key_id] = g
        self._owners.setdefault((scope, g.policy), {})[g.digest] = key_id
        if g.expires_ms:
            heapq.heappush(self._expiries.setdefault(scope, []), (g.expires_ms, key_id))

    def _drop(self, scope: str, key_id: str, g: Granted) -> None:
        self._granted.get(scope, {}).pop(key_id, None)
        owners = self._owners.get((scope, g.policy), {})
        if owners.get(g.digest) == key_id:
            del owners[g.digest]

    # -- one policy ------------------------------------------------------------------------------

    async def sync_policy(self, scope: str, policy: CompiledPolicy,
                          keys: Iterable[SecretKey] | Callable[[], Iterable[SecretKey]]) -> None:
        """Judge the policy's Secrets again and write what changed: after the policy changed
        (its tiers), when one of its keys expired, and in full (:meth:`forget_synced`) after a
        start or a Redis loss. Nothing to do (no Redis command, no pass over the keys) when its
        tiers are those it was last judged with and no key of the scope has expired.

        ``keys`` (how to read the Secrets) is read under the scope's lock: an event for a
        Secret changed after that read waits for this judgement, then applies to what it wrote."""
        async with self._locks.setdefault(scope, asyncio.Lock()):
            now = _now_ms()
            tiers = frozenset(policy.tiers)
            first = self._first_expiry(scope)
            done = self._synced.get((scope, policy.name))
            if done == tiers and not (first and first <= now):
                return
            problems = self._problems.setdefault(scope, {})
            for key_id in [k for k, (p, _) in problems.items() if p == policy.name]:
                del problems[key_id]
            dups = self._dups.setdefault(scope, {})
            for key_id in [k for k, d in dups.items() if d.policy == policy.name]:
                del dups[key_id]
            holding = self._owners.get((scope, policy.name), {})
            mine = [k for k in (keys() if callable(keys) else keys) if k.policy == policy.name]
            # A Secret that holds its key keeps it: a duplicate listed first does not take it over.
            mine.sort(key=lambda k: k.digest is None or holding.get(k.digest) != k.key_id)
            owners: dict[bytes, str] = {}
            wanted: dict[str, tuple[bytes, grants.StoredGrant]] = {}
            for key in mine:
                want, problem = judge(key, policy, now)
                if want is not None and key.digest is not None and key.digest in owners:
                    want, problem = None, _same_key(owners[key.digest])
                    dups[key.key_id] = key
                if problem:
                    problems[key.key_id] = (policy.name, problem)
                if want is not None and key.digest is not None:
                    owners[key.digest] = key.key_id
                    wanted[key.key_id] = (key.digest, want)
            await self._release_moved(scope, policy.name, wanted)
            if done is None:
                await self._replace(scope, policy.ref, wanted)
            else:
                await self._update(scope, policy.ref, policy.name, wanted)
            self._synced[(scope, policy.name)] = tiers
            self._judged_with[(scope, policy.name)] = policy

    async def _release_moved(self, scope: str, name: str, wanted: Mapping[str, tuple[bytes, grants.StoredGrant]]) -> None:
        """Secrets of the policy whose grant is under another policy still (relabelled; their
        event comes after this judgement): that grant is let go first, else nothing would."""
        granted = self._granted.get(scope, {})
        for key_id in wanted:
            old = granted.get(key_id)
            if old is not None and old.policy != name:
                await self._release(scope, key_id, old, None)

    async def _replace(self, scope: str, ref: str, wanted: Mapping[str, tuple[bytes, grants.StoredGrant]]) -> None:
        """Redis holds exactly ``wanted`` for the policy: written, and every other key of its
        index revoked, under its keys lease."""
        staged = await keysapply.stage_grants(self.redis, ref, wanted.values())
        try:
            await staged.write(self.redis)
            revoked = await staged.revoke_unlisted(self.redis)
        finally:
            await staged.discard(self.redis)
        await self.counted(None)
        name = ref.split("/", 1)[1]
        self._forget_policy(scope, name)
        for key_id, (digest, want) in wanted.items():
            self._note(scope, key_id, Granted(name, digest, hash(grants.encode(want, ref)), want.expires_ms))
        log.info("policy %s: %s key grant(s) in Redis, %s no Secret backs revoked", ref, len(wanted), revoked)

    async def _update(self, scope: str, ref: str, name: str,
                      wanted: Mapping[str, tuple[bytes, grants.StoredGrant]]) -> None:
        granted = self._granted.get(scope, {})
        gone = [(key_id, g) for key_id, g in granted.items()
                if g.policy == name and (key_id not in wanted or wanted[key_id][0] != g.digest)]
        if gone:
            # A key another Secret now holds is written over below, not revoked first (no
            # moment without it).
            held = {digest for digest, _ in wanted.values()}
            revoked = [keyschema.client_for_api_key(g.digest) for _, g in gone if g.digest not in held]
            if revoked:
                await grantstore.revoke(self.redis, ref, revoked)
            for key_id, g in gone:
                self._drop(scope, key_id, g)
        writes: list[tuple[str, Granted, grantstore.GrantWrite]] = []
        for key_id, (digest, want) in wanted.items():
            value = grants.encode(want, ref)
            old = granted.get(key_id)
            if old is None or old.value != hash(value):
                writes.append((key_id, Granted(name, digest, hash(value), want.expires_ms),
                               grantstore.GrantWrite(keyschema.client_for_api_key(digest), value, want.expires_ms)))
        if writes:
            await grantstore.write(self.redis, ref, (w for _, _, w in writes))
            for key_id, g, _ in writes:
                self._note(scope, key_id, g)
        if gone or writes:
            await self.counted(None)

    async def policy_gone(self, scope: str, name: str) -> None:
        """The policy left the config: revoke every grant its index lists."""
        async with self._locks.setdefault(scope, asyncio.Lock()):
            ref = policy_ref(scope, name)
            async for page in grantstore.pages(self.redis, ref):
                await grantstore.revoke(self.redis, ref, page)
            await self.counted(None)
            self._forget_policy(scope, name)
            self._synced.pop((scope, name), None)
            self._judged_with.pop((scope, name), None)
            dups = self._dups.get(scope, {})
            for key_id in [k for k, d in dups.items() if d.policy == name]:
                del dups[key_id]
            problems = self._problems.get(scope, {})
            for key_id in [k for k, (p, _) in problems.items() if p == name]:
                del problems[key_id]

    def _forget_policy(self, scope: str, name: str) -> None:
        granted = self._granted.get(scope, {})
        for key_id in [k for k, g in granted.items() if g.policy == name]:
            del granted[key_id]
        self._owners.pop((scope, name), None)


def _same_key(owner: str) -> str:
    return f"the same key as Secret {owner.split('/', 1)[-1]}"
