"""``sluice apply --api-keys-file``: a keys file of any size becomes one policy's grants in
Redis, in bounded memory, in an order that never leaves fewer valid keys than before or after:

1. :func:`stage` reads and checks the whole file (:mod:`sluice_core.keysfile`). Its keys'
   client ids go into a set private to this run (:func:`~sluice_core.keyschema.grant_staging_key`,
   where duplicates show), the encoded grants into a private temporary file (digests only,
   never a plaintext key; removed on close). Any error: the set is dropped and nothing else
   was written (bad input changes nothing). The grants written next are what was checked,
   even if the file changes meanwhile.
2. :meth:`Staged.write` writes the grants in pipelined batches (index entries first), each
   batch announced as it lands (:func:`sluice_core.grantstore.write`): every listed key now
   works with its new grant, and the keys the file no longer lists still work.
3. :meth:`Staged.revoke_unlisted` pages through the policy's index (SSCAN) and revokes what
   the staging set does not hold: the keys the file dropped, and the grants that expired
   (an expired entry is not staged; grants have no TTL, so this is how they leave Redis).
4. The caller publishes the config document (without keys). A sidecar that still reads keys
   from the old document (embedded ``apiKeys``) switches to the grants at that moment, and by
   then they are complete: migrating an install with embedded keys never loses a key.

One run of a policy's keys at a time: :func:`stage` takes the policy's lease
(:func:`~sluice_core.keyschema.grant_lease_key`, ``SET NX PX`` with the run's id), renewed at
every batch; another run fails fast (:class:`LeaseHeld`). Each revocation page is decided in
one script call (``unlisted_keys.lua``) that first checks the lease is still this run's and its
staging set is still there: a lost lease or set stops the run before it revokes anything more.
A key written one at a time during the run (``configstore.put_grant``) lands in the run's
touched set and is not revoked by it. Left: a single write that lands between a page's
decision and its deletes (a few milliseconds) is revoked with the page; a key revoked alone
during a run whose file lists it may be written again by the run.
The staging and touched sets have no TTL; the run deletes them at its end (success or not) and
the next run of the policy sweeps what a killed run left.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sluice_core import grants, grantstore, keyschema, scripts
from sluice_core.configstore import REDIS_FAILURES, Client, ConfigStoreError
from sluice_core.errors import PolicyErrors
from sluice_core.keysfile import KeyEntry, KeysFile
from sluice_core.model import CompiledPolicy

LEASE_MS = 60_000
"""How long a run holds the policy's lease without renewing it (it renews at every batch, a
few milliseconds apart): how long a killed run blocks the next one."""


class LeaseHeld(ConfigStoreError):
    """Another run holds the policy's lease (or this run lost it, or its staging set)."""


@dataclass(eq=False)
class Staged:
    """A checked keys file: its keys staged in Redis and its grants spooled to disk. Use it
    once (write, then revoke_unlisted) and :meth:`discard` it."""

    policy_ref: str
    staging_key: str
    spool: IO[bytes]
    listed: int = 0  # entries staged (each a distinct key, not expired)
    expired: int = 0  # entries whose expiresAt has passed: they grant nothing

    def _grants(self) -> Iterator[grantstore.GrantWrite]:
        self.spool.seek(0)
        for line in self.spool:
            client_id, expires_ms, value = line.decode("ascii").rstrip("\n").split("\t", 2)
            yield grantstore.GrantWrite(client_id, value, int(expires_ms))

    run: str = ""  # this run's id: "<unix seconds>-<random>", the lease's value

    async def write(self, client: Client) -> grantstore.Changes:
        """Step 2: write every staged grant (each batch announced); return the keys whose grant
        is new or changed."""
        changes = grantstore.Changes()
        await grantstore.write(client, self.policy_ref, self._grants(), changes,
                               before_batch=lambda: self._lease(client, "renew"))
        return changes

    async def revoke_unlisted(self, client: Client) -> int:
        """Step 3: revoke every grant the policy's index lists and neither the file nor a single
        write during the run does; return how many index entries went."""
        n = 0
        changes = grantstore.Changes()
        async for page in grantstore.pages(client, self.policy_ref):
            n += await grantstore.revoke(client, self.policy_ref, await self._unlisted(client, page), changes)
        return n

    def _keys(self) -> tuple[str, str, str]:
        pid = keyschema.policy_id(self.policy_ref)
        return keyschema.grant_lease_key(pid), self.staging_key, keyschema.grant_touched_key(pid)

    async def _unlisted(self, client: Client, page: list[str]) -> list[str]:
        s = scripts.unlisted_keys()
        try:
            reply = await client.redis.eval(s.source, 3, *self._keys(), self.run, LEASE_MS, *page)
        except REDIS_FAILURES as exc:
            raise ConfigStoreError(f"cannot read the staged keys of policy {self.policy_ref!r}: {exc}") from exc
        self._check(reply)
        return [_text(m) for m in reply[1:]]

    async def _lease(self, client: Client, action: str) -> None:
        s = scripts.apply_lease()
        try:
            reply = await client.redis.eval(s.source, 3, *self._keys(), self.run, LEASE_MS, action)
        except REDIS_FAILURES as exc:
            raise ConfigStoreError(f"cannot {action} the keys lease of policy {self.policy_ref!r}: {exc}") from exc
        self._check(reply)

    def _check(self, reply: list[Any]) -> None:
        if reply[0] == 1:
            return
        if reply[0] == -1:
            raise LeaseHeld(f"Redis lost the keys staged for policy {self.policy_ref!r}: nothing more "
                            "revoked; apply again")
        holder, left_ms = _text(reply[1]), int(reply[2])
        if not holder:
            raise LeaseHeld(f"this run lost the keys lease of policy {self.policy_ref!r} (it expired): "
                            "nothing more written or revoked; apply again")
        started = holder.split("-", 1)[0]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(started))) if started.isdigit() else "?"
        raise LeaseHeld(f"another sluice apply (run {holder}, started {when}) is applying the keys of policy "
                        f"{self.policy_ref!r}; its lease expires in {max(left_ms, 0) / 1000:.1f} s unless it "
                        "renews it: try again after it ends")

    async def discard(self, client: Client) -> None:
        """Close the spool, and (if this run holds the lease) drop the staging and touched sets
        and the lease."""
        self.spool.close()
        if self.run:
            with contextlib.suppress(ConfigStoreError):  # else the next run sweeps them
                await self._lease(client, "release")


def _text(member: bytes | str) -> str:
    return member.decode() if isinstance(member, bytes) else member


async def stage(client: Client, policy: CompiledPolicy, path: str | Path, *, now_ms: int | None = None) -> Staged:
    """Step 1: check the whole keys file and stage it; :class:`PolicyErrors` (nothing written
    but the staging set, dropped again) when any entry is wrong."""
    reader = KeysFile(path, policy)
    staged = await stage_entries(client, policy.ref, reader, reader.fail, now_ms=now_ms)
    if reader.error_count:
        await staged.discard(client)
        raise PolicyErrors(reader.all_errors())
    return staged


async def stage_grants(client: Client, policy_ref: str, entries: Iterable[tuple[bytes, grants.StoredGrant]]) -> Staged:
    """Step 1 for grants already checked (the operator's key Secrets: every one of them, after
    a restart or a Redis loss, so that Redis matches them); ``entries``: (raw SHA-256, grant),
    each key once."""
    def duplicate(where: str, reason: str) -> None:
        raise ValueError(f"{where}: {reason}")  # the caller's keys are distinct: a bug if not

    return await stage_entries(client, policy_ref,
                               (KeyEntry(i, digest, g) for i, (digest, g) in enumerate(entries)), duplicate)


async def stage_entries(client: Client, policy_ref: str, entries: Iterable[KeyEntry],
                        duplicate: Callable[[str, str], None], *, now_ms: int | None = None) -> Staged:
    """Take the policy's lease and stage ``entries`` (expired ones skipped); ``duplicate`` hears
    of an entry whose key an earlier one has."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    run = f"{int(time.time())}-{secrets.token_hex(6)}"
    staged = Staged(policy_ref, keyschema.grant_staging_key(keyschema.policy_id(policy_ref)),
                    tempfile.TemporaryFile(prefix="sluice-keys-"))  # noqa: SIM115 (Staged.discard closes it)
    # (mode 0600 and unlinked at once: digests only, but nobody else's business)
    try:
        staged.run = run
        try:
            await staged._lease(client, "acquire")
        except ConfigStoreError:
            staged.run = ""  # not ours: nothing to release
            raise
        for chunk in grantstore.chunks(entries):
            await staged._lease(client, "renew")
            live = [e for e in chunk if e.stored.live(now)]
            staged.expired += len(chunk) - len(live)
            for e in await _stage_chunk(client, staged, live):
                duplicate(f"keys[{e.index}]", "the same key is listed twice (an earlier entry has it)")
    except BaseException:
        await staged.discard(client)
        raise
    return staged


async def _stage_chunk(client: Client, staged: Staged, entries: list[KeyEntry]) -> list[KeyEntry]:
    """Add these entries' keys to the staging set and spool their grants; return the entries
    whose key was there already (an earlier entry, or earlier in this chunk)."""
    ids = [keyschema.client_for_api_key(e.sha256) for e in entries]
    if not ids:
        return []
    try:
        before = await client.redis.smismember(staged.staging_key, ids)
        await client.redis.sadd(staged.staging_key, *ids)
    except REDIS_FAILURES as exc:
        raise ConfigStoreError(f"cannot stage the keys of policy {staged.policy_ref!r}: {exc}") from exc
    seen: set[str] = set()
    dups: list[KeyEntry] = []
    for e, cid, there in zip(entries, ids, before, strict=True):
        if there or cid in seen:
            dups.append(e)
            continue
        seen.add(cid)
        staged.spool.write(f"{cid}\t{e.stored.expires_ms}\t{grants.encode(e.stored, staged.policy_ref)}\n".encode("ascii"))
    staged.listed += len(seen)
    return dups
