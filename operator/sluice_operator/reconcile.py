"""The reconcile loop's core, free of kopf: policies and key Secrets of one namespace in, the
namespace's config document in Redis out, plus what each policy's status should say.

Rules it keeps:
- Validation is :func:`sluice_core.parse.parse_policy`, the same code as ``sluice check`` and the
  admission webhook.
- An invalid policy never replaces a good one: the last good compiled version of that policy
  stays in the document (also after an operator restart: it is recovered from Redis).
- Versions only rise: a re-push after Redis lost the config continues from the last version.
- Redis is written only when the document changed or is missing.
- Each write is counted in Redis (:data:`~sluice_core.keyschema.OPERATOR_EPOCH_KEY`), key grant
  writes too, so that one read an interval tells whether Redis still holds what was written
  (:meth:`Reconciler.intact`; :meth:`Reconciler.lost_grants` for a key index gone).

ClusterRateLimitPolicies are reconciled the same way into the document of the pseudo-namespace
``_cluster``, with each policy's namespaceSelector resolved to the namespaces it selects now
(sidecars cannot read namespace labels).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice_core import configdoc, configstore
from sluice_core.errors import PolicyError, PolicyErrors
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy, KeyGrant, Selector, Source
from sluice_core.parse import parse_policy

from sluice_operator.keygrants import KeyGrants, policy_ref
from sluice_operator.keysecrets import KeyProblem, SecretKey, embedded_grants
from sluice_operator.metrics import OperatorMetrics
from sluice_operator.redischeck import MemoryPolicyCheck

log = logging.getLogger("sluice.operator")
Keys = Sequence[SecretKey] | Callable[[], Sequence[SecretKey]]
"""A scope's key Secrets, or how to read them (handlers.py: only once they are listed)."""
RECOUNT_AFTER_S = (1.0, 3.0, 10.0)
"""After a new config version: when its sidecars are counted again (seconds); the later ones
for sidecars that were busy or had a Redis blip when they reloaded."""
RECONCILE_CONCURRENCY = 16
KEYS_LISTED_WAIT_S = 10.0


class KeysNotListed(Exception):
    """The key Secrets are not listed yet (API server slow, RBAC): a policy that identifies
    clients by API key is not judged from a partial listing (its own status reason)."""


@dataclass
class PolicyResult:
    name: str
    accepted: bool
    errors: list[PolicyError] = field(default_factory=list)
    serving: bool = False  # a compiled version of this policy is in the config
    tiers: int = 0
    key_problems: list[KeyProblem] = field(default_factory=list)
    keys: int = 0
    scope: list[str] | None = None  # cluster policies: the namespaces it selects now
    generation: int | None = None  # metadata.generation of the spec this result is about

    @property
    def message(self) -> str:
        return "; ".join(f"{e.path}: {e.reason}" for e in self.errors)


@dataclass
class NamespaceOutcome:
    namespace: str
    version: int = 0
    programmed: bool = False
    redis_error: str | None = None
    keys_error: str | None = None  # the key Secrets are not listed (nothing written)
    results: dict[str, PolicyResult] = field(default_factory=dict)
    pushed: bool = False

    @property
    def failed(self) -> str | None:
        """Why nothing was written (then retried), or None."""
        return self.redis_error or self.keys_error


@dataclass(frozen=True)
class Reuse:
    """A recent outcome will do (what a resync timer asks for): one less than ``max_age``
    seconds old that covers ``policy`` at ``generation``. Every policy of a namespace has its
    own timer and each reconcile covers them all, so one reconcile stands for the others'."""

    policy: str
    generation: int | None
    max_age: float


class Reconciler:
    """``scope`` names what this operator serves (its ``--namespace`` patterns, ``*``: the whole
    cluster) in the count of its writes kept in Redis."""

    def __init__(self, redis_client: configstore.Client, metrics: OperatorMetrics | None = None, *,
                 scope: str = "*") -> None:
        self.redis = redis_client  # the Reconciler's own: close() closes it
        self.metrics = metrics or OperatorMetrics()
        self.memory_check = MemoryPolicyCheck(redis_client, self.metrics)  # Redis's eviction policy
        self.scope = scope
        self._last_good: dict[str, dict[str, CompiledPolicy]] = {}
        self._known_version: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._latest: dict[str, tuple[float, NamespaceOutcome]] = {}  # namespace -> (when, outcome)
        self._expiry: dict[str, dt.datetime] = {}  # namespace -> when its first key expires
        self.changed = asyncio.Event()  # set by every successful reconcile (for the resync task)
        self._epoch: int | None = None  # the count of our writes Redis holds; None: not known
        self._epoch_lock = asyncio.Lock()
        # At start-up every policy's handler reconciles at once: a thousand at a time would
        # only queue for Redis connections (redis-py's pool refuses beyond 100), each holding
        # its parsed policies meanwhile.
        self._running = asyncio.Semaphore(RECONCILE_CONCURRENCY)
        self.keys = KeyGrants(redis_client)  # key Secrets as Redis grants, one Secret at a time
        self.keys.counted = lambda check: self.count_write(kept=check)  # grant writes count too
        # Whether every fresh sidecar of a namespace (None: of any namespace, for ``_cluster``)
        # reads keys from Redis grants; None: not known yet (no heartbeats read since the start).
        # Set by handlers.py to its HeartbeatView's.
        self.grants_ready: Callable[[str | None], bool | None] = lambda _namespace: None
        # Set once each key Secret listing is complete (handlers.py's watches; none: nothing to
        # wait for): a policy's keys are judged only from a complete listing.
        self.keys_listed: list[asyncio.Event] = []
        self._embedded: dict[str, bool] = {}  # scope -> whether its document in Redis embeds keys
        self.embed_keys = "auto"  # --embed-keys: "always"/"never" overrule the heartbeats
        # Policies a delete handler is removing (scope -> names): with policies marked deleted
        # in the index, the only ones that may leave a document unless the caller's index is
        # known complete (see _reconcile).
        self._leaving: dict[str, set[str]] = {}
        # Scopes that got a new config version -> when the resync counts their sidecars again
        # (monotonic): a sidecar reloads within milliseconds and beats at once, so `Enforced`
        # comes back within a second or so, not at the next sweep (#12, defect 5).
        self.recounts: dict[str, list[float]] = {}

    async def close(self) -> None:
        """Close the Redis client (at the operator's exit, in the loop that used it)."""
        await self.redis.aclose()

    async def reconcile(self, namespace: str, policies: Sequence[Mapping[str, Any]],
                        secrets: Keys,
                        namespace_labels: Mapping[str, Mapping[str, str]] | None = None, *,
                        reuse: Reuse | None = None, complete: bool = False) -> NamespaceOutcome:
        """``namespace_labels`` (name -> labels of every namespace) is needed for ``_cluster``.
        With ``reuse``, a recent enough outcome is returned instead; checked under the lock, so
        timers queued behind one reconcile (all of them fire at start-up) take its outcome.

        ``complete``: ``policies`` is known to be every policy of the scope (kopf's index, as
        its handlers get it: kopf runs none before its indexes are filled). Otherwise (a resync
        or key event on a replica that just became active: kopf fills nothing while paused) a
        policy the document serves leaves it only when marked deleted (a ``deletionTimestamp``,
        or :meth:`deleting`), never because it is missing: a missing one may be unlisted yet,
        and leaving would empty the document and revoke its keys' grants."""
        async with self._locks.setdefault(namespace, asyncio.Lock()):
            if reuse is not None:
                recent = self.latest(namespace, max_age=reuse.max_age)
                result = recent.results.get(reuse.policy) if recent else None
                if recent is not None and result is not None and result.generation == reuse.generation:
                    return recent
            async with self._running:
                started = time.perf_counter()
                out = await self._reconcile(namespace, policies, secrets, namespace_labels or {}, complete)
            m = self.metrics
            m.reconcile_seconds.observe(time.perf_counter() - started)
            if out.redis_error:
                m.redis_errors.inc()
            m.reconciles.labels("redis_error" if out.redis_error else
                                "keys_not_listed" if out.keys_error else
                                "invalid" if any(not r.accepted for r in out.results.values()) else "ok").inc()
            if out.pushed:
                m.pushes.inc()
                now = time.monotonic()
                self.recounts[namespace] = [now + delay for delay in RECOUNT_AFTER_S]
                self.changed.set()
            for key in [k for k in m.states if k[0] == namespace]:
                del m.states[key]
            for name, r in out.results.items():
                m.states[(namespace, name)] = (r.accepted, r.serving and out.programmed)
            if out.failed:
                self._latest.pop(namespace, None)
            else:
                self._latest[namespace] = (time.monotonic(), out)
                self._note_expiry(namespace)
            return out

    def _note_expiry(self, scope: str) -> None:
        first = self.keys.next_expiry(scope)
        if first is None:
            self._expiry.pop(scope, None)
        else:
            self._expiry[scope] = first
        self.changed.set()  # the resync task looks again at when to wake

    def rejudge_keys(self, scope: str) -> None:
        """A key event of the scope could not be written (Redis failed, or this replica was not
        the active one then): the resync reconciles the scope at once, as for an expired key
        (retried every second while it fails, and only on the active replica), and its
        policies' keys are judged in full. Only a scope this replica has reconciled: on one
        that has not (a passive replica's), its policies' handlers judge them in full once
        kopf has filled its index, and a reconcile before that would be from an empty one."""
        self.keys.unsync(scope)
        if scope in self._last_good:
            self._expiry[scope] = dt.datetime.now(dt.UTC)
            self.changed.set()

    def drop_expiry(self, scope: str) -> None:
        """The resync will not reconcile this scope (not in kopf's index): its next reconcile
        notes its first expiry again."""
        self._expiry.pop(scope, None)

    def deleting(self, scope: str, policy: str) -> None:
        """A delete handler removes the policy: its next reconcile takes it out of the
        document (and revokes its grants) whatever the index it is given holds."""
        self._leaving.setdefault(scope, set()).add(policy)

    def serves(self, scope: str, policy: str) -> bool:
        """Is the policy in the scope's config (its last good version)?"""
        return policy in self._last_good.get(scope, {})

    def embeds_keys(self, scope: str) -> bool:
        """Does the scope's document carry its policies' keys (``apiKeys``) besides their Redis
        grants? ``--embed-keys always``/``never`` say so for every scope. ``auto``: while a fresh
        sidecar there cannot read grants (a release from before them); not once every one of
        at least one fresh sidecar can; with no evidence either way (no heartbeat at all, or
        none read yet), as the document in Redis does (one an earlier operator wrote with keys
        keeps them; a new one has none: README "Upgrading" says why)."""
        if self.embed_keys != "auto":
            return self.embed_keys == "always"
        ready = self.grants_ready(None if scope == CLUSTER_SCOPE else scope)
        if ready is None:
            return self._embedded.get(scope, False)
        return not ready

    def embedding_changes(self, scope: str) -> bool:
        """Would the scope's document now embed keys where it does not, or the reverse?"""
        return scope in self._embedded and self._embedded[scope] != self.embeds_keys(scope)

    async def key_changed(self, scope: str, key_id: str, key: SecretKey | None) -> set[str]:
        """One key Secret changed (``key`` None: gone): its grant written or revoked, and the
        scope's last outcome updated (keys, key problems) for the status. Returns the policies
        it touched."""
        try:
            touched = await self.keys.secret_changed(scope, key_id, key, self._last_good.get(scope, {}))
        except configstore.ConfigStoreError as exc:
            # kopf does not retry an event handler: the resync reconciles the scope at once (as
            # for an expired key), retried every second, and judges its keys in full.
            log.warning("key Secret %s: %s (the resync writes its scope's keys again)", key_id, exc)
            self.rejudge_keys(scope)
            return set()
        latest = self._latest.get(scope)
        for name in touched:
            result = latest[1].results.get(name) if latest else None
            if result is not None:
                result.keys = self.keys.count(scope, name)
                result.key_problems = self.keys.problems(scope, name)
        self._note_expiry(scope)
        return touched

    async def forget(self, namespace: str) -> None:
        """The namespace is gone: drop what is kept of it here, and its config document from
        Redis if that is still the empty one its last policy left (namespaces come and go,
        e.g. one per preview environment; their leftovers would only accumulate)."""
        async with self._locks.setdefault(namespace, asyncio.Lock()):
            if self._last_good.get(namespace):
                return  # still serving policies: not for us to drop (a re-created namespace)
            try:
                dropped = await configstore.drop_if_empty(self.redis, namespace)
            except configstore.ConfigStoreError as exc:
                log.warning("namespace %s deleted; its empty config stays in Redis: %s", namespace, exc)
                dropped = False
            if dropped:
                log.info("namespace %s deleted: its empty config document removed", namespace)
            for kept in (self._last_good, self._known_version, self._latest, self._expiry, self._embedded,
                         self._leaving):
                kept.pop(namespace, None)
            self.keys.forget(namespace)

    async def cluster_doc_exists(self) -> bool:
        """Does Redis hold the cluster document? Missing: Redis lost everything (or is new);
        True when Redis cannot be read (nothing to restore that a read could not see)."""
        try:
            return await configstore.exists(self.redis, CLUSTER_SCOPE)
        except configstore.ConfigStoreError as exc:
            log.warning("cannot check the cluster config document: %s", exc)
            return True

    async def ensure_cluster_doc(self) -> bool:
        """Create the cluster document, empty (a placeholder), if Redis has none; True when it
        was created. Atomic and never over a document, so any replica may call it any time."""
        async with self._locks.setdefault(CLUSTER_SCOPE, asyncio.Lock()):
            floor = self._known_version.get(CLUSTER_SCOPE, 0) + 1
            try:
                version = await configstore.ensure(self.redis, CLUSTER_SCOPE, min_version=floor)
            except configstore.ConfigStoreError as exc:
                log.warning("cannot create the cluster config document: %s", exc)
                return False
            if version:
                self._known_version[CLUSTER_SCOPE] = version
                await self.count_write((CLUSTER_SCOPE, version))
                log.info("cluster config document was missing: created empty, version %s", version)
            return bool(version)

    async def count_write(self, written: tuple[str, int] | None = None, *,
                          kept: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Count one more write in Redis (a config document, or a key grant written or revoked:
        :attr:`KeyGrants.counted`). The count must rise by one from what this replica
        knows: otherwise Redis lost it (missing: restarted empty, flushed; lower: an older
        snapshot restored), or another replica wrote too (a leader change: its late write may
        undo this one's judgement), and :meth:`intact` says so at the next check.

        ``written``: the (namespace, version) just published, read back after the count
        (``kept``: any other read-back, e.g. a grant's value). The
        write and its count are two commands: an older snapshot restored between them holds
        the count from before the write, which this count then raises by exactly one, as if
        nothing were lost (the rolled-back document went unnoticed for good; the quarantined
        rollback test hit it when its restore landed in that gap)."""
        async with self._epoch_lock:
            try:
                value = await configstore.bump_epoch(self.redis, self.scope)
            except configstore.ConfigStoreError as exc:
                log.warning("cannot count a config write in Redis: %s", exc)
                self._epoch = None
                return
            counted = self._epoch is not None and value == self._epoch + 1
            self._epoch = value if counted else None
        if written is not None:
            namespace, version = written
            kept = lambda: self._holds(namespace, version)  # noqa: E731
        if counted and kept is not None:  # outside the lock: the writes of a start-up queue on it
            try:
                held = await kept()
            except configstore.ConfigStoreError as exc:
                log.warning("cannot read back a write: %s", exc)
                held = False
            if not held:
                self._epoch = None  # whatever was counted since: the next check restores

    async def _holds(self, namespace: str, version: int) -> bool:
        return (await configstore.stored_version(self.redis, namespace) or 0) >= version

    async def start_counting(self) -> bool:
        """Take the count from here (at start-up, and before re-writing everything): what
        was written before is checked by the reconciles that follow. False if Redis failed.
        Read, not raised: a replica that starts (a rolling update's new pod, passive) must not
        make the active one see a write it did not make and rewrite every grant."""
        async with self._epoch_lock:
            try:
                self._epoch = await configstore.bump_epoch(self.redis, self.scope, by=0)
            except configstore.ConfigStoreError as exc:
                log.warning("cannot count config writes in Redis: %s", exc)
                self._epoch = None
                return False
            return True

    async def intact(self) -> bool | None:
        """Does Redis still hold every config document and key grant this replica wrote? Two
        reads however many namespaces it serves: the count of its writes, and the documents'
        existence (one EXISTS per thousand). None when Redis does not answer: nothing is known
        lost, and the count stays what it was, so the next check that gets an answer tells
        (a blip must not cost a rewrite of every grant)."""
        if self._epoch is None:
            return False
        try:
            if await configstore.epoch(self.redis, self.scope) != self._epoch:
                return False
            return not await configstore.missing_configs(self.redis, sorted(self._known_version))
        except configstore.ConfigStoreError as exc:
            log.warning("cannot check the config in Redis (checked again next interval): %s", exc)
            return None

    async def lost_grants(self) -> list[str] | None:
        """The scopes with a policy whose key index is gone although it has keys granted here:
        Redis lost its grants where the count of writes cannot tell (a Cluster node restarted
        empty holds the index, not the count). One EXISTS per thousand policies; None when
        Redis does not answer."""
        held = {policy_ref(scope, name): scope for scope, name in self.keys.with_keys()}
        try:
            missing = await configstore.missing_grant_indexes(self.redis, sorted(held))
        except configstore.ConfigStoreError as exc:
            log.warning("cannot check the key grants in Redis (checked again next interval): %s", exc)
            return None
        return sorted({held[ref] for ref in missing})

    def next_expiries(self) -> dict[str, dt.datetime]:
        """Namespace -> when its first key expires (only those with expiring keys)."""
        return dict(self._expiry)

    def latest(self, namespace: str, *, max_age: float = math.inf) -> NamespaceOutcome | None:
        """The outcome of the namespace's last reconcile if it succeeded less than ``max_age``
        seconds ago."""
        entry = self._latest.get(namespace)
        if entry is None or time.monotonic() - entry[0] > max_age:
            return None
        return entry[1]

    async def _reconcile(self, namespace: str, policies: Sequence[Mapping[str, Any]],
                         secrets: Keys, namespace_labels: Mapping[str, Mapping[str, str]],
                         complete: bool) -> NamespaceOutcome:
        out = NamespaceOutcome(namespace)
        stored: tuple[int, str] | None = None
        try:
            stored = await configstore.read_raw(self.redis, namespace)
        except configstore.ConfigStoreError as exc:
            # Still validate, so that status says what is wrong with a policy; write nothing
            # and remember nothing (a later read may still recover the last good config).
            out.redis_error = str(exc)
        if namespace not in self._last_good and stored is not None:
            self._recover(namespace, stored)
        live, listed = self._live(namespace, policies, out, complete)
        if out.redis_error:
            return out
        gone = sorted(set(self._last_good.get(namespace, {})) - set(live))
        self._last_good[namespace] = live
        scopes: dict[str, list[str]] | None = None
        if namespace == CLUSTER_SCOPE:
            scopes = {name: resolve_namespaces(policy, namespace_labels) for name, policy in live.items()}
            for name, names in scopes.items():
                out.results[name].scope = names
        try:
            # Grants first: a sidecar that sees a new policy, or a document without embedded
            # keys, finds its keys in Redis already.
            try:
                grants = await self._sync_keys(namespace, live, secrets, out)
            except KeysNotListed as exc:
                out.keys_error = str(exc)
                return out
            embed = grants is not None
            # The last policy gone leaves an empty document, not none: a missing document means
            # Redis lost it (sidecars then keep their last good config), an empty one means
            # "enforce nothing here" and they stop limiting.
            doc = configdoc.build_doc(namespace, list(live.values()), grants, scopes)
            if stored is None and not live:
                out.programmed = True
                return out
            if stored is not None and stored[1] == doc:
                out.version = stored[0]
            else:
                floor = max(self._known_version.get(namespace, 0), stored[0] if stored else 0) + 1
                out.version = await configstore.publish(self.redis, namespace, doc, min_version=floor)
                out.pushed = True
                await self.count_write((namespace, out.version))
                log.info("namespace %s: config version %s (%s%s)", namespace, out.version,
                         ", ".join(sorted(live)) or "no policies", "; keys embedded" if embed else "")
            self._embedded[namespace] = embed
            self._known_version[namespace] = out.version
            out.programmed = True
            for name in gone:  # out of the document first: then nothing looks their keys up
                await self.keys.policy_gone(namespace, name)
                self._leaving.get(namespace, set()).discard(name)
            self._leaving.get(namespace, set()).difference_update(listed & set(live))  # re-created
        except configstore.ConfigStoreError as exc:
            out.redis_error = str(exc)
        return out

    def _live(self, namespace: str, policies: Sequence[Mapping[str, Any]], out: NamespaceOutcome,
              complete: bool) -> tuple[dict[str, CompiledPolicy], set[str]]:
        """The policies the document serves (each one's last good version; their results in
        ``out``), and the names ``policies`` lists."""
        last_good = dict(self._last_good.get(namespace, {}))  # this reconcile's working copy
        live: dict[str, CompiledPolicy] = {}
        listed: set[str] = set()
        for body in policies:
            meta = body.get("metadata", {})
            name = str(meta.get("name", ""))
            listed.add(name)
            if meta.get("deletionTimestamp"):
                continue  # being deleted: leaves the config now
            out.results[name] = _judge_policy(namespace, body, last_good)
            if name in last_good:
                live[name] = last_good[name]
        if not complete:  # see reconcile(): missing from the index is no evidence of deletion
            leaving = self._leaving.get(namespace, set())
            for name, policy in last_good.items():
                if name not in listed and name not in leaving:
                    live[name] = policy
        return live, listed

    async def _sync_keys(self, namespace: str, live: Mapping[str, CompiledPolicy], keys: Keys,
                         out: NamespaceOutcome) -> dict[str, Mapping[str, KeyGrant]] | None:
        """Each live policy's key grants in Redis as its Secrets say; the keys the document
        embeds (None: none, sidecars read the grants). Not before the Secrets are listed: the
        document stays as it is meanwhile (:class:`KeysNotListed`, retried). Policies that do not
        identify clients by API key never wait: they are judged once the listing is there."""
        if not all(e.is_set() for e in self.keys_listed):
            if any(Source.API_KEY in p.identify.order for p in live.values()):
                try:
                    async with asyncio.timeout(KEYS_LISTED_WAIT_S):
                        for listed in self.keys_listed:
                            await listed.wait()
                except TimeoutError:
                    raise KeysNotListed("key Secrets not listed yet (API server slow or refusing: "
                                        "see the operator's log)") from None
            elif self.embeds_keys(namespace):
                return {name: {} for name in live}  # no key is looked up: nothing to embed
            else:
                return None  # judged by a reconcile once listed (nothing looks their keys up)
        for name, policy in live.items():
            await self.keys.sync_policy(namespace, policy, keys)  # read under its lock
            result = out.results.get(name)  # none: kept though not listed (see reconcile())
            if result is not None:
                result.keys = self.keys.count(namespace, name)
                result.key_problems = self.keys.problems(namespace, name)
        if not self.embeds_keys(namespace):
            return None
        # Sidecars of an older release read keys from the document: the old cost, O(keys).
        secrets = keys() if callable(keys) else keys  # read once listed: never a partial listing
        now_ms = time.time_ns() // 1_000_000
        return {name: embedded_grants(policy, secrets, now_ms)[0] for name, policy in live.items()}

    def _recover(self, namespace: str, stored: tuple[int, str]) -> None:
        """After a restart: what Redis serves is the last good config of every policy."""
        try:
            cfg = configdoc.load_doc(stored[1], stored[0])
        except PolicyErrors:
            return
        self._last_good[namespace] = {p.name: p for p in cfg.policies}
        self._embedded[namespace] = bool(cfg.grants)  # an older operator's document embeds them
        self._known_version[namespace] = stored[0]


def _judge_policy(namespace: str, body: Mapping[str, Any], last_good: dict[str, CompiledPolicy]) -> PolicyResult:
    """Validate one policy; a valid one becomes its ``last_good`` version."""
    meta = body.get("metadata", {})
    name = str(meta.get("name", ""))
    generation = meta.get("generation")
    result = PolicyResult(name, accepted=True, generation=generation if isinstance(generation, int) else None)
    try:
        last_good[name] = parse_policy(_as_document(body), source=f"{namespace}/{name}", default_namespace=namespace)
    except PolicyErrors as exc:
        result.accepted = False
        result.errors = exc.errors
    if name in last_good:
        result.serving = True
        result.tiers = len(last_good[name].tiers)
    return result


def resolve_namespaces(policy: CompiledPolicy, namespace_labels: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The namespaces a cluster policy's namespaceSelector selects (sorted)."""
    selector = policy.namespace_selector or Selector()
    return sorted(ns for ns, labels in namespace_labels.items() if selector.matches(dict(labels)))


def _as_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Kubernetes object that are the policy (no status, no managed fields)."""
    meta = body.get("metadata", {})
    doc_meta = {"name": meta.get("name")}
    if meta.get("namespace"):
        doc_meta["namespace"] = meta["namespace"]
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": doc_meta,
            "spec": body.get("spec")}
