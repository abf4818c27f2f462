"""kopf wiring: indexes of policies and key Secrets per namespace, handlers that reconcile a
namespace through :class:`~sluice_operator.reconcile.Reconciler`, a resync timer, key expiry."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import kopf

from sluice_operator.keysecrets import POLICY_LABEL
from sluice_operator.kube import default_api_client
from sluice_operator.reconcile import NamespaceOutcome, Reconciler
from sluice_operator.settings import OperatorSettings
from sluice_operator.status import policy_status
from sluice_operator.webhooks import serve_webhooks

GROUP, VERSION, PLURAL = "sluice.dev", "v1alpha1", "ratelimitpolicies"
FINALIZER = "sluice.dev/config"
log = logging.getLogger("sluice.operator")


def build_registry(settings: OperatorSettings, reconciler: Reconciler,
                   api_client: Callable[[], Any] | None = None) -> kopf.OperatorRegistry:
    """``api_client``: a factory of kubernetes ``ApiClient`` for what kopf does not do itself
    (webhook configurations, namespace labels); default: in-cluster config, else kubeconfig."""
    registry = kopf.OperatorRegistry()
    expiry_tasks: dict[str, asyncio.Task[None]] = {}
    make_api = api_client or default_api_client

    @kopf.on.startup(registry=registry)
    async def start_webhooks(memo: kopf.Memo, **_: Any) -> None:
        if not settings.webhook_listen:
            return
        memo["webhooks"] = await serve_webhooks(settings, make_api())

    @kopf.on.cleanup(registry=registry)
    async def stop_webhooks(memo: kopf.Memo, **_: Any) -> None:
        server = memo.get("webhooks")
        if server is not None:
            await server.stop()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.WARNING

    @kopf.index(GROUP, VERSION, PLURAL, id="policies_by_ns", registry=registry)
    def policies_by_ns(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {namespace or "": dict(body)}

    @kopf.index("v1", "secrets", labels={POLICY_LABEL: kopf.PRESENT}, id="key_secrets_by_ns",
                registry=registry)
    def key_secrets_by_ns(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {namespace or "": dict(body)}

    async def reconcile(namespace: str, policies: kopf.Index[str, Any],
                        secrets: kopf.Index[str, Any]) -> NamespaceOutcome:
        outcome = await reconciler.reconcile(namespace, list(policies.get(namespace, [])),
                                             list(secrets.get(namespace, [])))
        if outcome.next_expiry is not None:
            schedule_expiry(namespace, outcome.next_expiry, policies, secrets)
        return outcome

    def schedule_expiry(namespace: str, when: dt.datetime, policies: kopf.Index[str, Any],
                        secrets: kopf.Index[str, Any]) -> None:
        """Expired keys must stop working within seconds, not at the next resync."""
        old = expiry_tasks.get(namespace)
        if old is not None and not old.done():
            old.cancel()

        async def later() -> None:
            delay = (when - dt.datetime.now(dt.UTC)).total_seconds()
            await asyncio.sleep(max(0.0, delay) + 0.05)
            await reconcile(namespace, policies, secrets)

        expiry_tasks[namespace] = asyncio.create_task(later())

    def report(body: kopf.Body, name: str, outcome: NamespaceOutcome, patch: kopf.Patch,
               enforced: int | None) -> None:
        result = outcome.results.get(name)
        patch.status.update(policy_status(body, result, outcome, enforced))
        if result is not None and not result.accepted:
            kopf.warn(body, reason="InvalidPolicy", message=result.message[:1000])
        if outcome.redis_error:
            raise kopf.TemporaryError(f"Redis: {outcome.redis_error}", delay=5)

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="policy", registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="policy", registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="policy", field="spec", registry=registry)
    async def policy_changed(namespace: str | None, name: str, body: kopf.Body, patch: kopf.Patch,
                             **kwargs: Any) -> None:
        policies_by_ns, key_secrets_by_ns = kwargs["policies_by_ns"], kwargs["key_secrets_by_ns"]
        outcome = await reconcile(namespace or "", policies_by_ns, key_secrets_by_ns)
        report(body, name, outcome, patch, None)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="policy-delete", registry=registry)
    async def policy_deleted(namespace: str | None, **kwargs: Any) -> None:
        policies_by_ns, key_secrets_by_ns = kwargs["policies_by_ns"], kwargs["key_secrets_by_ns"]
        outcome = await reconcile(namespace or "", policies_by_ns, key_secrets_by_ns)
        if outcome.redis_error:  # keep the finalizer until Redis no longer serves the policy
            raise kopf.TemporaryError(f"Redis: {outcome.redis_error}", delay=5)

    @kopf.on.event("v1", "secrets", labels={POLICY_LABEL: kopf.PRESENT}, id="key-secret",
                   registry=registry)
    async def key_secret_changed(namespace: str | None, **kwargs: Any) -> None:
        policies_by_ns, key_secrets_by_ns = kwargs["policies_by_ns"], kwargs["key_secrets_by_ns"]
        if namespace and policies_by_ns.get(namespace):
            await reconcile(namespace, policies_by_ns, key_secrets_by_ns)

    @kopf.timer(GROUP, VERSION, PLURAL, id="resync", interval=settings.resync_interval_s,
                registry=registry)
    async def resync(namespace: str | None, name: str, body: kopf.Body, patch: kopf.Patch,
                     **kwargs: Any) -> None:
        policies_by_ns, key_secrets_by_ns = kwargs["policies_by_ns"], kwargs["key_secrets_by_ns"]
        """Redis is volatile: put back lost config, and report how many sidecars enforce it."""
        outcome = await reconcile(namespace or "", policies_by_ns, key_secrets_by_ns)
        enforced = None
        if outcome.programmed and outcome.version:
            enforced = await reconciler.enforced(namespace or "", outcome.version,
                                                 stale_s=settings.heartbeat_stale_s)
        report(body, name, outcome, patch, enforced)

    @kopf.on.cleanup(registry=registry)
    async def stop_expiry_tasks(**_: Any) -> None:
        for task in expiry_tasks.values():
            task.cancel()
        for task in expiry_tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return registry
