"""``sluice apply --api-keys-file``: a keys file of any size becomes one policy's grants in
Redis, in bounded memory, in an order that never leaves fewer valid keys than before or after:

1. :func:`stage` reads and checks the whole file (:mod:`sluice_core.keysfile`). Its keys'
   client ids go into a set private to this run (:func:`~sluice_core.keyschema.grant_staging_key`,
   where duplicates show), the encoded grants into a private temporary file (digests only,
   never a plaintext key; removed on close). Any error: the set is dropped and nothing else
   was written (bad input changes nothing). The grants written next are what was checked,
   even if the file changes meanwhile.
2. :meth:`Staged.write` writes the grants in pipelined batches (index entries first), then
   announces the changed ones (:func:`sluice_core.grantstore.announce`): every listed key now
   works with its new grant, and the keys the file no longer lists still work.
3. :meth:`Staged.revoke_unlisted` pages through the policy's index (SSCAN) and revokes what
   the staging set does not hold, then announces those.
4. The caller publishes the config document (without keys). A sidecar that still reads keys
   from the old document (embedded ``apiKeys``) switches to the grants at that moment, and by
   then they are complete: migrating an install with embedded keys never loses a key.

One apply of a policy's keys at a time: two concurrent runs could revoke each other's keys (the
second run's revocations then heal on the next apply).
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sluice_core import grants, grantstore, keyschema
from sluice_core.configstore import _FAILURES, Client, ConfigStoreError
from sluice_core.errors import PolicyErrors
from sluice_core.keysfile import KeyEntry, KeysFile
from sluice_core.model import CompiledPolicy

STAGING_TTL_MS = 6 * 3600 * 1000
"""A run's staging set outlives any run (a million keys stage in seconds) and then goes away
by itself when a run is cut short; it is refreshed at every batch."""


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

    async def write(self, client: Client) -> grantstore.Changes:
        """Step 2: write every staged grant; return the keys whose grant is new or changed."""
        changes = grantstore.Changes()
        await grantstore.write(client, self.policy_ref, self._grants(), changes)
        await grantstore.announce(client, self.policy_ref, changes)
        return changes

    async def revoke_unlisted(self, client: Client) -> int:
        """Step 3: revoke every grant the policy's index lists and the file does not; return
        how many index entries went."""
        await self._check_staging(client)
        n = 0
        changes = grantstore.Changes()
        async for page in grantstore.pages(client, self.policy_ref):
            n += await grantstore.revoke(client, self.policy_ref,
                                         await grantstore.missing_from(client, self.staging_key, page), changes)
        await grantstore.announce(client, self.policy_ref, changes)
        return n

    async def _check_staging(self, client: Client) -> None:
        """A staging set Redis lost (a restart, an eviction) would revoke every key: refuse."""
        try:
            held = await client.redis.scard(self.staging_key)
            await client.redis.pexpire(self.staging_key, STAGING_TTL_MS)
        except _FAILURES as exc:
            raise ConfigStoreError(f"cannot read the staged keys of policy {self.policy_ref!r}: {exc}") from exc
        if held != self.listed:
            raise ConfigStoreError(f"Redis lost the keys staged for policy {self.policy_ref!r} "
                                   f"({held} of {self.listed} left): nothing revoked; apply again")

    async def discard(self, client: Client) -> None:
        self.spool.close()
        with contextlib.suppress(*_FAILURES):  # else its TTL removes it
            await client.redis.unlink(self.staging_key)  # freed in the background, whatever its size


async def stage(client: Client, policy: CompiledPolicy, path: str | Path, *, now_ms: int | None = None) -> Staged:
    """Step 1: check the whole keys file and stage it; :class:`PolicyErrors` (nothing written
    but the staging set, dropped again) when any entry is wrong."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    reader = KeysFile(path, policy)
    staged = Staged(policy.ref, keyschema.grant_staging_key(keyschema.policy_id(policy.ref), secrets.token_hex(8)),
                    tempfile.TemporaryFile(prefix="sluice-keys-"))  # noqa: SIM115 (Staged.discard closes it)
    # (mode 0600 and unlinked at once: digests only, but nobody else's business)
    try:
        for chunk in grantstore.chunks(reader):
            live = [e for e in chunk if e.stored.live(now)]
            staged.expired += len(chunk) - len(live)
            for e in await _stage_chunk(client, staged, live):
                reader.fail(f"keys[{e.index}]", "the same key is listed twice (an earlier entry has it)")
    except BaseException:
        await staged.discard(client)
        raise
    if reader.error_count:
        await staged.discard(client)
        raise PolicyErrors(reader.all_errors())
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
        await client.redis.pexpire(staged.staging_key, STAGING_TTL_MS)
    except _FAILURES as exc:
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
