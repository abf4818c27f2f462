"""API keys whose grants live in Redis: a key the policy's grant cache does not know is
resolved in the decision call (``scripts/decide.lua``'s "resolve" decision), what it found is
learnt into the cache, and a failure or a flood is answered without opening the breaker. The
limiter (:class:`sluice_sidecar.limiter.Limiter`) mixes this in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from multidict import MultiMapping
from prometheus_client import Histogram
from sluice_core import grants as stored_grants
from sluice_core import keyschema
from sluice_core.gcra import Reply, Resolved

from sluice_sidecar.breaker import CircuitBreaker
from sluice_sidecar.enforcement import (
    Bucket,
    Enforcement,
    Granted,
    Outcome,
    Plan,
    plan_buckets,
    refused,
)
from sluice_sidecar.grantcache import Ticket
from sluice_sidecar.identify import anonymous_client
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.stores.base import DecisionStore, ResolveAsk, StoreUnavailable
from sluice_sidecar.usage_note import UsageNote

log = logging.getLogger("sluice.limiter")


@dataclass(frozen=True, slots=True)
class Resolve:
    """One policy's part of a request whose API key must be resolved from its Redis grant."""

    enforcement: Enforcement
    client: str  # the key's client id
    rule_name: str
    rule_b: Bucket | None
    cost: int
    fallback: Plan  # the anonymous client's default-tier buckets (an unknown key, a failure)
    ticket: Ticket  # the cache's ticket for the key when the resolve was planned (GrantCache.put)


class KeyResolving:
    """The limiter's resolve path (its attributes and decision steps declared here)."""

    store: DecisionStore
    metrics: Metrics
    breaker: CircuitBreaker
    resolving: int
    max_resolves: int
    _hist: Histogram

    def _finish(self, plan: Plan, reply: Reply | None, note: UsageNote | None) -> Outcome:
        raise NotImplementedError

    async def _decide_one(self, plan: Plan, note: UsageNote | None) -> Outcome:
        raise NotImplementedError

    def _unauthorized(self, enforcement: Enforcement, rule_name: str, keyed: bool,
                      note: UsageNote | None) -> Outcome:
        raise NotImplementedError

    def _count(self, e: Enforcement, tier: str, rule: str, outcome: str, note: UsageNote | None) -> None:
        """A decision without buckets (skipped, unauthorized, failed closed before asking):
        counted in Prometheus and, when usage is on, in the request's note (client unnamed)."""
        self.metrics.decision(e.label, tier, rule, outcome)
        self._note(note, e.usage_ref, e.policy.usage.truncate_ips, tier, rule, outcome)

    def _counted(self, plan: Plan, outcome: str, tokens: int, note: UsageNote | None) -> None:
        """A decision over ``plan``'s buckets: counted as :meth:`_count` does, with its client."""
        e = plan.enforcement
        self.metrics.decision(e.label, plan.tier_b.name, plan.rule_name, outcome)
        if note is not None:
            note.append((e.usage_ref, e.policy.usage.truncate_ips, plan.client, plan.key_id,
                                   plan.tier_b.name, plan.rule_name, outcome, tokens))

    @staticmethod
    def _note(note: UsageNote | None, policy: str, truncate_ips: bool, tier: str, rule: str, outcome: str) -> None:
        if note is not None:
            note.append((policy, truncate_ips, "", "", tier, rule, outcome, 0))

    def _resolving(self, enforcement: Enforcement, client: str, rule_name: str, rule_b: Bucket | None,
                   cost: int, headers: MultiMapping[str], peer: str) -> Resolve:
        """A key the cache does not know: resolve its grant (with the anonymous client's
        default-tier buckets as the fallback for an unknown key, and to name a failure; where a
        key is required they only name a failure: the key's own client stands in)."""
        policy = enforcement.policy
        fallback = plan_buckets(enforcement, rule_name, rule_b, cost, enforcement.tiers[policy.default_tier],
                            client if policy.api_keys.required
                            else anonymous_client(headers, peer, enforcement.peers))
        assert enforcement.cache is not None
        return Resolve(enforcement, client, rule_name, rule_b, cost, fallback, enforcement.cache.ticket(client))

    @staticmethod
    def _ask_resolve(r: Resolve, cost: int) -> ResolveAsk:
        """The resolve decision for ``r``'s key and rule bucket (no fallback buckets)."""
        e = r.enforcement
        assert e.tier_args is not None
        tag = keyschema.client_tag_for(e.policy_id, r.client)
        rule_keys, rule_params = ((tag + r.rule_b.suffix,), r.rule_b.params) if r.rule_b else ((), ())
        return ResolveAsk(keyschema.grant_key(e.policy_id, r.client), cost, rule_keys, rule_params,
                          (), (), e.tier_args)

    async def _resolve_and_decide(self, r: Resolve, note: UsageNote | None) -> Outcome:
        """One policy, a key the cache does not know: resolve and decide in one call. An unknown
        key takes the fallback buckets in that call where the store can (one node), else in a
        second call; with ``required`` it is refused (nothing was written)."""
        e, fb = r.enforcement, r.fallback
        required = e.policy.api_keys.required
        if self.resolving >= self.max_resolves:
            return self._busy(r, note) if required else await self._decide_one(fb, note)
        ask = self._ask_resolve(r, r.cost)
        if not required and self.store.atomic((ask.grant_key, *fb.keys)):
            ask = ask._replace(fallback_keys=fb.keys, fallback_params=fb.params)
        resolved = await self._resolve(ask)
        if resolved is None:
            return self._unresolved(r, note)
        granted = self._learn(r, resolved.grant)
        if granted is not None and resolved.reply is not None:
            return self._finish(plan_buckets(e, r.rule_name, r.rule_b, r.cost, granted.bucket, r.client,
                                             granted.key_id), resolved.reply, note)
        if required:
            return self._unauthorized(e, r.rule_name, True, note)
        if resolved.grant is None and resolved.reply is not None:
            return self._finish(fb, resolved.reply, note)  # decided in the same call
        return await self._decide_one(fb, note)

    async def _settle(self, r: Resolve, note: UsageNote | None) -> Plan | Outcome:
        """A pod under two policies: resolve the key first, reading only (cost 0: nothing is
        taken or written), then decide as for a cached key."""
        e = r.enforcement
        if self.resolving >= self.max_resolves:
            return self._busy(r, note) if e.policy.api_keys.required else r.fallback
        resolved = await self._resolve(self._ask_resolve(r, 0))
        if resolved is None:
            return self._unresolved(r, note)
        granted = self._learn(r, resolved.grant)
        if granted is not None:
            return plan_buckets(e, r.rule_name, r.rule_b, r.cost, granted.bucket, r.client, granted.key_id)
        if e.policy.api_keys.required:
            return self._unauthorized(e, r.rule_name, True, note)
        return r.fallback

    def _busy(self, r: Resolve, note: UsageNote | None) -> Outcome:
        """A required key not cached while --max-key-resolves are in flight: 503, not asked."""
        e = r.enforcement
        self._count(e, "", r.rule_name, "failed_closed", note)
        return refused(503, [("Retry-After", "1")], e.policy.name, rule=r.rule_name,
                       detail="the rate limiter is checking too many API keys right now")

    def _unresolved(self, r: Resolve, note: UsageNote | None) -> Outcome:
        """The store could not resolve the key. One the cache knew, however long ago, counts as
        it was then (the last good state). Otherwise, where a key is required, 503 whatever the
        failure mode: a key that could not be checked is never forwarded (else a flood that
        slows Redis down would get random keys past the requirement). Otherwise the policy's
        failure mode answers, as for the anonymous client the key may turn out to be."""
        e = r.enforcement
        assert e.cache is not None
        last = e.cache.last(r.client)  # the last good state: a key known before stays known
        if isinstance(last, Granted):
            return self._finish(plan_buckets(e, r.rule_name, r.rule_b, r.cost, last.bucket, r.client,
                                             last.key_id), None, note)
        if not e.policy.api_keys.required:
            return self._finish(r.fallback, None, note)
        if last is not None:
            return self._unauthorized(e, r.rule_name, True, note)
        self._count(e, "", r.rule_name, "failed_closed", note)
        return refused(503, [("Retry-After", "1")], e.policy.name, rule=r.rule_name,
                       detail="the rate limiter cannot check the API key right now")

    def _learn(self, r: Resolve, value: str | None) -> Granted | None:
        """The bucket a resolved grant names and the key's id (None: an unknown key), cached."""
        e = r.enforcement
        granted, expires_ms = None, 0
        if value is not None:
            try:
                stored = stored_grants.decode(value, e.policy.ref)
            except ValueError as exc:  # says what is wrong, never the value
                log.warning("an API key grant of %s is unreadable; the key counts as unknown: %s",
                            e.policy.ref, exc)
            else:
                bucket = e.grant_bucket(stored.grant)
                granted = Granted(bucket, stored.key_id) if bucket is not None else None
                expires_ms = stored.expires_ms
        assert e.cache is not None
        e.cache.put(r.client, granted, expires_ms, r.ticket)
        self.metrics.grant_resolved(e.label, "known" if granted else "unknown")
        return granted

    async def _resolve(self, ask: ResolveAsk) -> Resolved | None:
        """:meth:`_ask` for a "resolve" decision."""
        breaker = self.breaker
        if not breaker.allow():
            self.metrics.store_errors.labels(self.store.name, "circuit_open").inc()
            return None
        started = time.perf_counter()
        self.resolving += 1
        try:
            resolved = await self.store.resolve(ask)
        except StoreUnavailable as exc:
            # Counted, but kept out of the breaker: which keys miss the cache is the client's
            # choice, so a flood of random keys that slows Redis down would otherwise open it
            # and switch limiting off for every request (failure mode open). A Redis that is
            # really away fails the ordinary decisions too, and they open it.
            self.metrics.store_errors.labels(self.store.name, exc.reason).inc()
            log.debug("API key resolve failed: %s", exc)
            return None
        finally:
            self.resolving -= 1
        breaker.success()
        self._hist.observe(time.perf_counter() - started)
        return resolved
