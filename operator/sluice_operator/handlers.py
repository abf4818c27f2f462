"""kopf wiring: indexes of policies and key Secrets per namespace, handlers that reconcile a
namespace through :class:`~sluice_operator.reconcile.Reconciler`, and one resync task for all
policies (:mod:`sluice_operator.resync`: Redis checked, heartbeats read, keys expired)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf
from sluice_core.model import CLUSTER_SCOPE

from sluice_operator.coalesce import Coalescer
from sluice_operator.diffbase import MemoryDiffBase
from sluice_operator.heartbeats import HeartbeatView
from sluice_operator.indexwait import quiet_index_wait
from sluice_operator.keyevents import KeyEvents
from sluice_operator.kube import default_api_client
from sluice_operator.reconcile import NamespaceOutcome, Reconciler, Reuse
from sluice_operator.resync import Gate, Hooks, Resync, Standalone
from sluice_operator.secretwatch import served as served_ns
from sluice_operator.settings import OperatorSettings
from sluice_operator.status import status_update
from sluice_operator.taskstop import stop_tasks
from sluice_operator.usage_status import UsageStatus
from sluice_operator.webhooks import serve_webhooks

GROUP, VERSION, PLURAL = "sluice.dev", "v1alpha1", "ratelimitpolicies"
CLUSTER_PLURAL = "clusterratelimitpolicies"
FINALIZER = "sluice.dev/config"
"""kopf's finalizer name. No handler needs it any more (a deletion is handled from its watch
event): kopf removes it from policies that still carry it (those of earlier releases). A
finalizer that outlives the operator leaves policies, and namespaces with them, stuck in
Terminating after ``helm uninstall`` (#12, defect 4)."""
DELETE_RETRY_S = 5.0  # a deletion whose reconcile failed (Redis away) is tried again this often
STATUS_TIMEOUT_S = 10.0  # a status write of ours (kubernetes client, in a thread)
log = logging.getLogger("sluice.operator")


def build_registry(settings: OperatorSettings, reconciler: Reconciler,
                   api_client: Callable[[], Any] | None = None, gate: Gate | None = None) -> kopf.OperatorRegistry:
    """``api_client``: a factory of kubernetes ``ApiClient`` for what kopf does not do itself
    (webhook configurations, namespace labels, status writes of the resync); default:
    in-cluster config, else kubeconfig. ``gate``: whether this replica is the active one
    (:class:`~sluice_operator.peering.PeeringGate`); default: always (standalone)."""
    quiet_index_wait()  # kopf's start-up wait for its indexes: N wake-ups, not N²
    registry = kopf.OperatorRegistry()
    make_api = api_client or default_api_client
    reconciler.embed_keys = settings.embed_keys
    active = gate or Standalone()

    @kopf.on.startup(registry=registry)
    async def start_webhooks(memo: kopf.Memo, **idx: Any) -> None:
        if not settings.webhook_listen:
            return

        def policies(namespace: str) -> list[Mapping[str, Any]]:
            """The namespace's policies and every cluster policy, from kopf's live indexes."""
            found = list(idx["policies_by_ns"].get(namespace, []))
            if "cluster_policies" in idx:
                found += list(idx["cluster_policies"].get(CLUSTER_SCOPE, []))
            return found

        memo["webhooks"] = await serve_webhooks(settings, make_api(), policies)

    @kopf.on.cleanup(registry=registry)
    async def stop_webhooks(memo: kopf.Memo, **_: Any) -> None:
        server = memo.get("webhooks")
        if server is not None:
            await server.stop()

    @kopf.on.startup(registry=registry)
    async def check_redis(**_: Any) -> None:
        """Warn at once when Redis would refuse decisions or evict config once full."""
        await reconciler.memory_check.run()

    handled = MemoryDiffBase()  # the last handled spec of each policy: no annotation PATCH per policy

    retries: dict[str, asyncio.Task[None]] = {}  # scope -> the task retrying its deletion reconcile

    @kopf.on.cleanup(registry=registry)
    async def stop_retries(**_: Any) -> None:
        await stop_tasks(list(retries.values()))

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.diffbase_storage = handled
        settings.posting.level = logging.WARNING

    @kopf.index(GROUP, VERSION, PLURAL, id="policies_by_ns", registry=registry)
    def policies_by_ns(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {namespace or "": policy_view(body)}

    # Key Secrets: listed and watched by the operator itself (secretwatch.py says why not kopf),
    # each event its key's grant (keyevents.py).
    serves_cluster = settings.cluster_policies or (settings.cluster_policies is None and not settings.namespaces)
    keys = KeyEvents(settings, reconciler, make_api, active, lambda scope, idx: reconcile(scope, idx),
                     lambda scope, outcome, idx: refresh_statuses(scope, outcome, idx), cluster_keys=serves_cluster)

    @kopf.on.startup(registry=registry)
    async def start_key_watches(**idx: Any) -> None:
        keys.start(idx)

    coalescer: Coalescer[NamespaceOutcome] = Coalescer()  # a burst of events for one namespace: two reconciles, not one each

    async def reconcile(namespace: str, idx: Mapping[str, Any], reuse: Reuse | None = None, *,
                        complete: bool = False) -> NamespaceOutcome:
        """Reconcile one namespace's document (or ``_cluster``'s) from kopf's indexes, which
        every handler receives among its keyword arguments; then, if Redis lost everything (no
        cluster document), put everything back. ``complete``: called from a kopf handler (kopf
        runs them only once its indexes are filled; the resync and the key Secret watches may
        run on a replica whose kopf has not filled them yet: ``Reconciler.reconcile``)."""
        if reuse is None:  # a run shared with a request that would take a recent outcome is not fresh
            outcome = await coalescer.run(namespace, lambda: reconcile_scope(namespace, idx, complete=complete))
        else:
            outcome = await reconcile_scope(namespace, idx, reuse, complete=complete)
        if not outcome.failed and not await reconciler.cluster_doc_exists():
            log.warning("Redis has no cluster config document (lost or new): writing every config")
            await restore_all(idx)
        return outcome

    async def restore_all(idx: Mapping[str, Any]) -> None:
        """Every namespace's config this replica serves, then the cluster document (its own, or
        the empty placeholder): in that order, so that a pod started meanwhile finds its
        namespace's policy before the placeholder that tells "no namespace policy" from "lost"."""
        reconciler.keys.forget_synced()  # and every policy's key grants, in full
        for namespace in sorted(ns for ns, store in idx["policies_by_ns"].items() if ns and store):
            await refresh_statuses(namespace, await reconcile_scope(namespace, idx), idx)
        if "cluster_policies" in idx and idx["cluster_policies"].get(CLUSTER_SCOPE):
            await refresh_statuses(CLUSTER_SCOPE, await reconcile_scope(CLUSTER_SCOPE, idx), idx)
        await reconciler.ensure_cluster_doc()

    @kopf.on.startup(registry=registry)
    async def start_resync(memo: kopf.Memo, **idx: Any) -> None:
        """The cluster document always exists (a sidecar whose namespace has no document then
        knows it is under no namespace policy, not that Redis lost it): created now if missing.
        Writes are counted from here; then one task resyncs every policy
        (:class:`~sluice_operator.resync.Resync`), from kopf's live indexes."""
        await reconciler.start_counting()
        await reconciler.ensure_cluster_doc()
        sidecars = HeartbeatView(reconciler.redis, settings.heartbeat_stale_s)
        reconciler.grants_ready = sidecars.grants_ready  # whether documents may stop embedding keys

        def served() -> dict[str, Sequence[Mapping[str, Any]]]:
            scopes: dict[str, Sequence[Mapping[str, Any]]] = {
                ns: list(store) for ns, store in idx["policies_by_ns"].items() if ns and store}
            if idx.get("cluster_policies") and idx["cluster_policies"].get(CLUSTER_SCOPE):
                scopes[CLUSTER_SCOPE] = list(idx["cluster_policies"][CLUSTER_SCOPE])
            return scopes

        async def reconcile_and_report(scope: str) -> None:
            await refresh_statuses(scope, await reconcile(scope, idx), idx)

        async def deleted_meanwhile(scope: str, name: str) -> None:
            """A policy sidecars still enforce that kopf's index lacks: deleted while no
            operator ran (no finalizer holds a deletion), or not listed yet. Only the API
            server's 404 takes it out of the document."""
            ours = serves_cluster if scope == CLUSTER_SCOPE else served_ns(scope, settings.namespaces)
            if not ours:
                return
            if await asyncio.to_thread(policy_exists, scope, name):
                return
            log.info("policy %s/%s was deleted while no operator ran: taking it out of Redis", scope, name)
            reconciler.deleting(scope, name)
            await refresh_statuses(scope, await reconcile(scope, idx), idx)

        hooks = Hooks(served=served, restore=lambda: restore_all(idx), reconcile=reconcile_and_report,
                      write_status=write_status, deleted_meanwhile=deleted_meanwhile)
        usage = UsageStatus(reconciler.redis, settings.usage_status_min_s)  # status.usage from the collector's summary
        resync = Resync(settings.resync_interval_s, reconciler, sidecars, active, hooks, usage=usage)
        memo["resync"] = asyncio.create_task(resync.run(), name="sluice resync")

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task is not None:
            await stop_tasks([task])
        await keys.stop()

    async def reconcile_scope(namespace: str, idx: Mapping[str, Any], reuse: Reuse | None = None, *,
                              complete: bool = False) -> NamespaceOutcome:
        if namespace == CLUSTER_SCOPE:
            labels: dict[str, Mapping[str, str]] = {
                name: next(iter(store), {}) for name, store in idx["namespace_labels"].items()}
            return await reconciler.reconcile(
                CLUSTER_SCOPE, list(idx["cluster_policies"].get(CLUSTER_SCOPE, [])),
                lambda: keys.records(CLUSTER_SCOPE), labels, reuse=reuse, complete=complete)
        return await reconciler.reconcile(namespace, list(idx["policies_by_ns"].get(namespace, [])),
                                          lambda: keys.records(namespace), reuse=reuse, complete=complete)

    def report(body: kopf.Body, name: str, outcome: NamespaceOutcome, patch: kopf.Patch) -> None:
        result = outcome.results.get(name)
        status = status_update(body, result, outcome)
        if status is not None:  # kopf would send any non-empty patch, also one that changes nothing
            patch.status.update(status)
            reconciler.metrics.status_writes.inc()
        if result is not None and not result.accepted:
            kopf.warn(body, reason="InvalidPolicy", message=result.message[:1000])
        if outcome.redis_error:
            raise kopf.TemporaryError(f"Redis: {outcome.redis_error}", delay=5)
        if outcome.keys_error:
            raise kopf.TemporaryError(outcome.keys_error, delay=5)

    custom_api: list[Any] = []  # one client, made when first needed

    def patch_status(scope: str, name: str, status: dict[str, Any]) -> None:
        from kubernetes import client

        if not custom_api:
            custom_api.append(client.CustomObjectsApi(make_api()))
        # Bounded: a thread stuck in a call that never answers would hold up the operator's
        # exit (asyncio.run waits for its executor's threads), cancelled or not.
        api, body = custom_api[0], {"status": status}
        opts: dict[str, Any] = {"_content_type": "application/merge-patch+json", "_request_timeout": STATUS_TIMEOUT_S}
        if scope == CLUSTER_SCOPE:
            api.patch_cluster_custom_object_status(GROUP, VERSION, CLUSTER_PLURAL, name, body, **opts)
        else:
            api.patch_namespaced_custom_object_status(GROUP, VERSION, scope, PLURAL, name, body, **opts)

    def policy_exists(scope: str, name: str) -> bool:
        """Is the policy there (True also when the API server cannot say)? A list by name: the
        operator's role lists and watches policies, it does not get them."""
        from kubernetes import client

        if not custom_api:
            custom_api.append(client.CustomObjectsApi(make_api()))
        api = custom_api[0]
        opts = {"field_selector": f"metadata.name={name}", "_request_timeout": STATUS_TIMEOUT_S}
        try:
            if scope == CLUSTER_SCOPE:
                found = api.list_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, **opts)
            else:
                found = api.list_namespaced_custom_object(GROUP, VERSION, scope, PLURAL, **opts)
        except Exception:
            return True
        return bool(found.get("items"))

    async def refresh_statuses(scope: str, outcome: NamespaceOutcome, idx: Mapping[str, Any],
                               skip: str | None = None) -> None:
        """Patch the status of the scope's policies that a reconcile none of their own handlers
        ran for has changed (keys, key problems, config version, namespaces), now rather than at
        their next resync. A failed write is logged; that resync still corrects it."""
        if outcome.failed:
            return  # their own handlers report it, with a retry
        index = idx["cluster_policies"] if scope == CLUSTER_SCOPE else idx["policies_by_ns"]
        for body in list(index.get(scope, [])):
            meta = body.get("metadata", {})
            name = meta.get("name")
            result = outcome.results.get(name)
            if name == skip or result is None or meta.get("deletionTimestamp"):
                continue
            status = status_update(body, result, outcome)
            if status is not None:
                await write_status(scope, name, status)

    async def write_status(scope: str, name: str, status: dict[str, Any]) -> None:
        """A failed write is logged: the policy's next event or reconcile writes it again."""
        reconciler.metrics.status_writes.inc()
        try:
            await asyncio.to_thread(patch_status, scope, name, status)
        except Exception as exc:  # gone meanwhile, API server unreachable
            log.warning("cannot update the status of %s/%s: %s", scope, name, exc)

    # At start-up every policy of a namespace resumes at once: what one of them reconciled less
    # than half an interval ago stands for the others.
    shared_s = settings.resync_interval_s / 2

    def policy_handlers(plural: str, suffix: str) -> None:
        """Handlers of one policy kind: namespaced policies go to their namespace's document,
        cluster policies (no namespace) to ``_cluster``'s."""

        @kopf.on.resume(GROUP, VERSION, plural, id="policy" + suffix, registry=registry)
        @kopf.on.create(GROUP, VERSION, plural, id="policy" + suffix, registry=registry)
        @kopf.on.update(GROUP, VERSION, plural, id="policy" + suffix, field="spec", registry=registry)
        async def policy_changed(namespace: str | None, name: str, body: kopf.Body, patch: kopf.Patch,
                                 reason: str, **kwargs: Any) -> None:
            # At start-up every policy resumes (and its timer fires) at once: one reconcile of
            # the namespace serves them all. A create or update always reconciles.
            reuse = Reuse(name, body.metadata.get("generation"), shared_s) if reason == "resume" else None
            outcome = await reconcile(namespace or CLUSTER_SCOPE, kwargs, reuse, complete=True)
            if outcome.pushed:  # a new config version: the namespace's other policies show it
                await refresh_statuses(namespace or CLUSTER_SCOPE, outcome, kwargs, skip=name)
            report(body, name, outcome, patch)

        @kopf.on.event(GROUP, VERSION, plural, id="policy-delete" + suffix, registry=registry)
        async def policy_deleted(type: str | None, namespace: str | None, name: str, uid: str | None,
                                 **kwargs: Any) -> None:
            """The policy is gone (no finalizer holds it: see FINALIZER); kopf's index no longer
            has it, so the scope's document is written without it."""
            if type != "DELETED":
                return
            handled.forget(uid)
            scope = namespace or CLUSTER_SCOPE
            reconciler.deleting(scope, name)
            outcome = await reconcile(scope, kwargs, complete=True)
            if outcome.failed and scope not in retries:  # Redis away: until it takes the write
                retries[scope] = asyncio.create_task(retry_deletion(scope, kwargs), name=f"sluice delete {scope}")
            elif outcome.pushed:
                await refresh_statuses(scope, outcome, kwargs)

    async def retry_deletion(scope: str, idx: Mapping[str, Any]) -> None:
        try:
            while True:
                await asyncio.sleep(DELETE_RETRY_S)
                outcome = await reconcile(scope, idx, complete=True)
                if not outcome.failed:
                    await refresh_statuses(scope, outcome, idx)
                    return
                log.warning("policy deleted in %s: Redis still serves it (%s); trying again in %.0f s",
                            scope, outcome.failed, DELETE_RETRY_S)
        finally:
            retries.pop(scope, None)

    policy_handlers(PLURAL, "")

    if serves_cluster:
        # ClusterRateLimitPolicies need every namespace's labels (their namespaceSelector); by
        # default only a cluster-wide operator serves them, so that operators restricted to some
        # namespaces never fight over them (or their finalizers).
        @kopf.index(GROUP, VERSION, CLUSTER_PLURAL, id="cluster_policies", registry=registry)
        def cluster_policies(body: kopf.Body, **_: Any) -> dict[str, Any]:
            return {CLUSTER_SCOPE: policy_view(body)}

        @kopf.index("v1", "namespaces", id="namespace_labels", registry=registry)
        def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
            return {name: dict(labels)}

        policy_handlers(CLUSTER_PLURAL, "-cluster")

        # Namespaces are watched only here (an operator serving cluster policies needs their
        # labels): a deleted one is forgotten, a relabelled one may change a policy's scope.
        label_changes = LabelChanges()

        @kopf.on.event("v1", "namespaces", id="namespace", registry=registry)
        async def namespace_changed(type: str | None, name: str, labels: kopf.Labels, **kwargs: Any) -> None:
            if type == "DELETED":
                await reconciler.forget(name)
                coalescer.forget(name)
            if label_changes.changed(type, name, labels) and kwargs["cluster_policies"].get(CLUSTER_SCOPE):
                log.info("namespace %s: %s, re-resolving cluster policies", name,
                         "deleted" if type == "DELETED" else "labels changed")
                await refresh_statuses(CLUSTER_SCOPE, await reconcile(CLUSTER_SCOPE, kwargs, complete=True), kwargs)

    # Registered last, so it runs after the other cleanup handlers (kopf runs them in order,
    # once every handler, timer and daemon has stopped): nothing uses Redis after it.
    @kopf.on.cleanup(registry=registry)
    async def close_redis(**_: Any) -> None:
        await reconciler.close()

    return registry


class LabelChanges:
    """Which namespace events can change a cluster policy's scope: a namespace created,
    deleted or relabelled. Annotations, status and finalizers cannot; kopf reports those too.

    A namespace first seen in a listing (event type None) is not a change: at start-up kopf
    fills the namespace index before any handler runs, so the cluster policies' resume handlers
    already resolve against every namespace (one reconcile, not one per namespace); after a
    watch gap, a namespace created meanwhile joins at its cluster policies' next resync."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, str]] = {}

    def changed(self, event_type: str | None, name: str, labels: Mapping[str, str]) -> bool:
        if event_type == "DELETED":
            self._seen.pop(name, None)
            return True
        now = dict(labels)
        before, self._seen[name] = self._seen.get(name), now
        if before is None and event_type is None:
            return False
        return now != before


def policy_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the indexes keep of a policy: what reconciles and status writes read, not the
    whole object (managed fields, annotations: most of its bytes, times a thousand)."""
    meta = body.get("metadata", {})
    view = {k: body[k] for k in ("apiVersion", "kind", "spec", "status") if body.get(k) is not None}
    view["metadata"] = {k: meta[k] for k in ("name", "namespace", "generation", "deletionTimestamp") if k in meta}
    return view
