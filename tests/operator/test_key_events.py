"""Key Secret events against a policy's judgement, duplicates and documents that embed keys:
the operator's key path (:class:`~sluice_operator.keyevents.KeyEvents` over a
:class:`~sluice_operator.reconcile.Reconciler`, no kopf) driven event by event, as its watch
does, with real Redis.

Scenarios from review 14: an event that lands while a policy's first judgement runs (#1), a
watch that must not wait for reconciles of a document that embeds keys (#5), two Secrets with
the same key (#6), and the key ids an embedded document carries."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sluice_core import configdoc, configstore, keyschema
from sluice_operator.keyevents import KeyEvents
from sluice_operator.keysecrets import POLICY_LABEL
from sluice_operator.reconcile import NamespaceOutcome, Reconciler
from sluice_operator.resync import Standalone
from sluice_operator.settings import OperatorSettings

DEADLINE_S = 15.0


def policy(name: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": ns, "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "identify": {"order": ["apiKey", "ip"]},
                     "apiKeys": {"header": "X-API-Key", "required": True},
                     "tiers": [{"name": "free", "requests": 100, "period": "1m"}]}}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(ns: str, name: str, key: str, *, policy: str = "p", disabled: bool = False) -> dict[str, Any]:
    data = {"key": b64(key), "tier": b64("free")}
    if disabled:
        data["disabled"] = b64("true")
    return {"metadata": {"name": name, "namespace": ns, "labels": {POLICY_LABEL: policy}}, "data": data}


@dataclass
class Keys:
    """The operator's key path for one namespace: its watch fed by hand."""

    ns: str
    reconciler: Reconciler
    events: KeyEvents
    policies: list[dict[str, Any]]
    reconciles: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # a reconcile waits for it

    @property
    def watch(self) -> Any:
        return self.events.watches[""]

    async def put(self, kind: str, body: dict[str, Any]) -> None:
        """One watch event: the record kept, then reported (as KeySecretWatch._watch does)."""
        scope, key_id = self.watch._put(kind, body)
        await self.events.changed(scope, key_id, self.watch.records.get(scope, {}).get(key_id))

    async def settled(self) -> None:
        settle: Callable[[], Awaitable[None]] | None = getattr(self.events, "settled", None)
        if settle is not None:  # before the fix, reconciles ran inside the event
            await settle()

    async def grant(self, api_key: str, policy: str = "p") -> Any:
        return await configstore.get_grant(self.reconciler.redis, f"{self.ns}/{policy}",
                                           bytes.fromhex(keyschema.hash_api_key(api_key)))

    async def judging(self) -> None:
        """Until a judgement of the namespace's keys holds their lock (it has read the Secrets
        and is writing grants)."""
        deadline = time.monotonic() + DEADLINE_S
        while not ((lock := self.reconciler.keys._locks.get(self.ns)) and lock.locked()):
            assert time.monotonic() < deadline, "no judgement started"
            await asyncio.sleep(0)


@pytest.fixture
async def keys(redis_server: Any) -> AsyncIterator[Keys]:
    ns = "ke-" + uuid.uuid4().hex[:10]
    reconciler = Reconciler(configstore.connect(redis_server.url))
    holder: list[Keys] = []

    async def reconcile(scope: str, _idx: Any) -> NamespaceOutcome:
        k = holder[0]
        k.reconciles += 1
        await k.hold.wait()
        return await reconciler.reconcile(scope, list(k.policies), lambda: k.events.records(scope))

    async def statuses(*_: Any) -> None:
        pass

    settings = OperatorSettings(redis=redis_server.url)
    events = KeyEvents(settings, reconciler, lambda: None, Standalone(), reconcile, statuses, cluster_keys=False)
    k = Keys(ns, reconciler, events, [policy("p", ns)])
    k.hold.set()
    holder.append(k)
    k.watch.listed.set()
    yield k
    await events.stop()
    await reconciler.close()


async def first_judgement_with_an_event(k: Keys, n: int, event: Callable[[], Awaitable[None]]) -> None:
    """A policy's first judgement (operator start, Redis loss) of ``n`` Secrets, with ``event``
    landing after it read them and before it is done."""
    names = [str(p["metadata"]["name"]) for p in k.policies]
    for i in range(n):
        k.watch._put("ADDED", secret(k.ns, f"k{i}", f"key-{k.ns}-{i}", policy=names[i % len(names)]))
    judgement = asyncio.create_task(k.reconciler.reconcile(k.ns, k.policies, lambda: k.events.records(k.ns)))
    await k.judging()
    assert not judgement.done()
    await event()
    await judgement
    await k.settled()


async def test_a_secret_deleted_during_the_first_judgement_loses_its_grant(keys: Keys) -> None:
    await first_judgement_with_an_event(keys, 300, lambda: keys.put("DELETED", secret(keys.ns, "k0", "")))
    assert await keys.grant(f"key-{keys.ns}-0") is None
    assert await keys.grant(f"key-{keys.ns}-1") is not None


async def test_a_secret_disabled_during_the_first_judgement_loses_its_grant(keys: Keys) -> None:
    api_key = f"key-{keys.ns}-0"
    await first_judgement_with_an_event(
        keys, 300, lambda: keys.put("MODIFIED", secret(keys.ns, "k0", api_key, disabled=True)))
    assert await keys.grant(api_key) is None


async def test_a_secret_relabelled_during_the_first_judgement_moves_its_grant(keys: Keys) -> None:
    keys.policies.append(policy("q", keys.ns))
    api_key = f"key-{keys.ns}-0"  # k0 is p's: relabelled to q while p's keys are judged
    await first_judgement_with_an_event(
        keys, 300, lambda: keys.put("MODIFIED", secret(keys.ns, "k0", api_key, policy="q")))
    assert await keys.grant(api_key, "p") is None
    moved = await keys.grant(api_key, "q")
    assert moved is not None and moved.key_id == f"{keys.ns}/k0"


async def judged(k: Keys, *bodies: dict[str, Any]) -> None:
    for body in bodies:
        k.watch._put("ADDED", body)
    out = await k.reconciler.reconcile(k.ns, k.policies, lambda: k.events.records(k.ns))
    assert out.programmed, out.redis_error


@pytest.mark.parametrize("let_go", ["DELETED", "disabled", "rotated"])
async def test_the_next_secret_with_the_same_key_takes_it_over(keys: Keys, let_go: str) -> None:
    ns, api_key = keys.ns, f"shared-{keys.ns}"
    await judged(keys, secret(ns, "a", api_key))
    for name in ("b", "c"):  # later Secrets with the same key: refused, while a holds it
        await keys.put("ADDED", secret(ns, name, api_key))
    assert [(p.secret, p.reason) for p in keys.reconciler.keys.problems(ns, "p")] == [
        ("b", "the same key as Secret a"), ("c", "the same key as Secret a")]
    body = secret(ns, "a", f"other-{ns}" if let_go == "rotated" else api_key, disabled=let_go == "disabled")
    await keys.put("MODIFIED" if let_go != "DELETED" else "DELETED", body)
    held = await keys.grant(api_key)
    assert held is not None and held.key_id == f"{ns}/b"  # never revoked: b's grant written over a's
    assert [(p.secret, p.reason) for p in keys.reconciler.keys.problems(ns, "p")] == [
        ("c", "the same key as Secret b")]
    assert keys.reconciler.keys.count(ns, "p") == (2 if let_go == "rotated" else 1)


async def test_a_new_judgement_keeps_the_secret_that_holds_a_key(keys: Keys) -> None:
    ns, api_key = keys.ns, f"shared-{keys.ns}"
    await judged(keys, secret(ns, "b", f"own-{ns}"))
    await keys.put("ADDED", secret(ns, "c", api_key))  # listed after b, before a
    await keys.put("MODIFIED", secret(ns, "b", api_key))  # b: now the same key as c, refused
    keys.reconciler.keys.forget_synced()  # a full judgement of the records in their order: b, c
    await judged(keys)
    held = await keys.grant(api_key)
    assert held is not None and held.key_id == f"{ns}/c"


async def embedding(k: Keys, n: int) -> None:
    """A namespace whose document embeds keys (a sidecar of an older release beats there)."""
    k.reconciler.grants_ready = lambda _ns: False
    await judged(k, *(secret(k.ns, f"k{i}", f"key-{k.ns}-{i}") for i in range(n)))


async def embedded(k: Keys) -> dict[str, Any]:
    stored = await configstore.read_raw(k.reconciler.redis, k.ns)
    assert stored is not None
    return dict(configdoc.load_doc(stored[1], stored[0]).grants["p"])


async def test_a_relist_of_unchanged_secrets_reconciles_nothing(keys: Keys) -> None:
    await embedding(keys, 50)
    keys.reconciles = 0
    await keys.watch._report_all()  # after a watch gap: every record reported again
    await keys.settled()
    assert keys.reconciles == 0


async def test_key_events_do_not_wait_for_a_reconcile_of_an_embedding_document(keys: Keys) -> None:
    await embedding(keys, 5)
    keys.reconciles = 0
    keys.hold.clear()  # every reconcile now waits: the watch must not

    async def burst() -> None:  # as the watch: one event after the other
        for i in range(20):
            await keys.put("ADDED", secret(keys.ns, f"new{i}", f"new-{keys.ns}-{i}"))

    await asyncio.wait_for(burst(), DEADLINE_S)
    assert await keys.grant(f"new-{keys.ns}-19") is not None
    keys.hold.set()
    await keys.settled()
    assert keys.reconciles <= 2  # the one held during the burst, one after it
    doc = await embedded(keys)
    assert len(doc) == 25


async def test_an_embedded_document_names_each_key(keys: Keys) -> None:
    await embedding(keys, 3)
    doc = await embedded(keys)
    assert sorted(g.key_id for g in doc.values()) == [f"{keys.ns}/k{i}" for i in range(3)]
