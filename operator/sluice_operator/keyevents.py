"""Key Secret events into grants and statuses: the watches of the key Secrets
(:mod:`sluice_operator.secretwatch`), each event one grant written or revoked
(:meth:`Reconciler.key_changed`), the policies' status (keys, key problems) written once a burst
is over. The kopf wiring (handlers.py) hands in how to reconcile a scope and write its
statuses; the watches' events carry no kopf kwargs, so kopf's live indexes are taken from the
start-up handler's (:meth:`KeyEvents.start`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sluice_core.model import CLUSTER_SCOPE

from sluice_operator.keysecrets import CLUSTER_POLICY_LABEL, POLICY_LABEL, SecretKey
from sluice_operator.reconcile import NamespaceOutcome, Reconciler
from sluice_operator.resync import Gate
from sluice_operator.secretwatch import KeySecretWatch, named_namespaces, served
from sluice_operator.settings import OperatorSettings
from sluice_operator.taskstop import stop_tasks

log = logging.getLogger("sluice.operator")

STATUS_DELAY_S = 0.5
"""A burst of key events writes its policies' status once this long after its first event:
at most two writes a second per scope, not one per Secret."""
RECONCILE_GAP_S = 0.5
"""While key events keep coming for a scope whose document embeds keys, it is reconciled at most
once per this long (each run reads every key Secret of the scope)."""

Reconcile = Callable[[str, Mapping[str, Any]], Awaitable[NamespaceOutcome]]
WriteStatuses = Callable[[str, NamespaceOutcome, Mapping[str, Any]], Awaitable[None]]


class KeyEvents:
    def __init__(self, settings: OperatorSettings, reconciler: Reconciler, api_client: Callable[[], Any],
                 gate: Gate, reconcile: Reconcile, write_statuses: WriteStatuses, *, cluster_keys: bool) -> None:
        self.reconciler = reconciler
        self.gate = gate
        self.reconcile = reconcile
        self.write_statuses = write_statuses
        self.indexes: dict[str, Any] = {}
        # Namespaces given by name: one watch each (namespaced RBAC is enough); else one for all.
        names = named_namespaces(settings.namespaces)
        self.watches = {ns: KeySecretWatch(api_client, POLICY_LABEL,
                                           lambda ns: ns if served(ns, settings.namespaces) else None, self.changed,
                                           namespace=ns or None) for ns in (names or [""])}
        if cluster_keys:
            keys_ns = settings.cluster_keys_namespace
            self.watches[CLUSTER_SCOPE] = KeySecretWatch(
                api_client, CLUSTER_POLICY_LABEL, lambda ns: CLUSTER_SCOPE if ns == keys_ns else None,
                self.changed, namespace=keys_ns)
        reconciler.keys_listed = [w.listed for w in self.watches.values()]
        self._tasks: list[asyncio.Task[None]] = []
        self._statuses: dict[str, asyncio.Task[None]] = {}  # scope -> its pending status write
        self._reconciles: dict[str, asyncio.Task[None]] = {}  # scope -> its reconcile task
        self._again: set[str] = set()  # scopes whose reconcile must (also) start after now

    def records(self, scope: str) -> list[SecretKey]:
        """The scope's key Secrets (complete once :attr:`KeySecretWatch.listed`)."""
        watch = self.watches.get(scope) or self.watches.get("")
        return watch.keys(scope) if watch is not None else []

    def start(self, indexes: Mapping[str, Any]) -> None:
        self.indexes.update(indexes)
        self._tasks = [asyncio.create_task(w.run(), name=f"sluice key Secrets {w.label}")
                       for w in self.watches.values()]

    async def stop(self) -> None:
        await stop_tasks([*self._tasks, *self._statuses.values(), *self._reconciles.values()])

    async def settled(self) -> None:
        """Wait until no scope's reconcile is pending (its tasks' errors were logged)."""
        while self._reconciles:
            await asyncio.wait(list(self._reconciles.values()))  # out of the map when done

    async def changed(self, scope: str, key_id: str, key: SecretKey | None) -> None:
        """One key Secret's grant written or revoked: O(1) Redis writes, whatever the number of
        keys. What costs O(keys) (a policy's first judgement, a document that still embeds
        keys) runs in the scope's own task (:meth:`_reconcile_soon`), never in the watch,
        which serves every namespace one event at a time."""
        r = self.reconciler
        if not await self.gate.active():
            # Not the active replica (or not yet: kopf's peering decides at start-up): nothing
            # written now; once it is, the resync judges the scope's keys in full.
            if key is not None or r.keys.knows(scope, key_id):
                r.rejudge_keys(scope)
            return
        if key is not None and not r.keys.judged(scope, key.policy) and r.serves(scope, key.policy):
            # Its policy's keys were never judged here (a replica that just took over, a failed
            # write): judged in full soon, from the Secrets as they are then.
            self._reconcile_soon(scope)
        # Always, also while that judgement runs: the grant waits for it (KeyGrants' lock), then
        # applies to what it wrote. A judgement that read the Secrets before this event would
        # otherwise leave its older state (a deleted or disabled key still granted).
        touched = await r.key_changed(scope, key_id, key)
        if not touched:
            return  # nothing changed (a Secret reported again after a watch gap)
        if r.embeds_keys(scope):
            self._reconcile_soon(scope)  # sidecars of an older release read keys from the document
        else:
            self._statuses_soon(scope)

    def _reconcile_soon(self, scope: str) -> None:
        """Reconcile the scope (and write its statuses) in its own task: at once if none runs,
        else once more after the running one, however many events came meanwhile."""
        self._again.add(scope)
        if scope in self._reconciles:
            return

        async def run() -> None:
            try:
                while scope in self._again:
                    self._again.discard(scope)
                    outcome = await self.reconcile(scope, self.indexes)
                    if outcome.redis_error:  # retried by the resync, keys judged in full
                        self.reconciler.rejudge_keys(scope)
                    await self.write_statuses(scope, outcome, self.indexes)
                    if scope in self._again:
                        await asyncio.sleep(RECONCILE_GAP_S)  # a burst: its other events land meanwhile
            except Exception:
                log.exception("key Secrets of %s: reconcile failed (the resync retries it)", scope)
                self.reconciler.rejudge_keys(scope)
            finally:
                self._reconciles.pop(scope, None)

        self._reconciles[scope] = asyncio.create_task(run(), name=f"sluice key reconcile {scope}")

    def _statuses_soon(self, scope: str) -> None:
        """Write the scope's policies' status (keys, key problems) once the burst is over; none
        that changes nothing (the status writer compares)."""
        if scope in self._statuses:
            return

        async def write() -> None:
            await asyncio.sleep(STATUS_DELAY_S)  # debounce: the burst's other events land meanwhile
            self._statuses.pop(scope, None)
            outcome = self.reconciler.latest(scope)
            if outcome is not None:
                await self.write_statuses(scope, outcome, self.indexes)

        self._statuses[scope] = asyncio.create_task(write(), name=f"sluice key status {scope}")
