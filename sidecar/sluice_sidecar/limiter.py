"""Per-request decisions: identify the client, pick the rule and the tier, ask the store once.

Everything that depends only on the config is computed when the config is loaded
(:class:`Enforcement`), so a request does string joins and dictionary look-ups, one hash of the
API key, and one store call.

A pod may be under two policies: its namespace's ``RateLimitPolicy`` (``policy``) and a
``ClusterRateLimitPolicy`` whose budget is shared across namespaces (``cluster_policy``). A
request must then pass both. Where one store call can hold both policies' buckets (a single Redis or
Sentinel, the in-memory store) it is one call, all-or-nothing across both. On a Redis Cluster
their hash tags (clients, policy ids) land in different slots, so they are two calls in order:
the namespace's policy first, the shared budget only if it admitted, so a client refused
locally never drains the budget it shares with other services; when the shared budget then
refuses, a third call gives the namespace policy its tokens back (a refund: exact once it has
run; in between, the client's own budget is held for one round trip).
A shadow policy is always asked on its own, so that it never holds the other back.

API keys: a policy loaded with its grants (standalone ``--api-keys-file``, or a config document
that embeds ``apiKeys`` for it) looks a key up in memory. A policy whose document embeds none
has its keys resolved from their Redis grants (:mod:`sluice_core.grants`): a key the policy's
:class:`~sluice_sidecar.grantcache.GrantCache` knows takes the ordinary path; any other is a
"resolve" decision, which reads the grant, picks the bucket and decides in the same script call
(an unknown key writes nothing; where the store can take the anonymous fallback buckets in that
call too, they are decided there, else in a second call). A pod under two policies resolves a
missed key first, reading only (cost 0), and then decides as above.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from multidict import MultiMapping
from sluice_core import grants as stored_grants
from sluice_core import keyschema
from sluice_core.gcra import Reply, Resolved, expand
from sluice_core.model import (
    CompiledPolicy,
    FailureMode,
    HeaderStyle,
    KeyGrant,
    Limit,
    Mode,
    Source,
)
from sluice_core.sidecar_settings import (
    DEFAULT_GRANT_CACHE_MAX_AGE_S,
    DEFAULT_GRANT_CACHE_SIZE,
    DEFAULT_MAX_KEY_RESOLVES,
)

from sluice_sidecar import headers as hdr
from sluice_sidecar.breaker import CircuitBreaker
from sluice_sidecar.grantcache import GrantCache, Ticket
from sluice_sidecar.identify import PeerTrust, anonymous_client, api_key_from
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.stores.base import DecisionStore, ResolveAsk, StoreUnavailable, tier_args
from sluice_sidecar.transport.resp import Encoded

log = logging.getLogger("sluice.limiter")


@dataclass(frozen=True, slots=True)
class Bucket:
    """A bucket kind of the loaded policy: a tier (or a key's own limit) or a rule."""

    name: str  # tier or rule name (metrics)
    shown: str  # its name in headers and messages (cluster policies: "<policy>/<name>")
    suffix: str  # appended to the client's hash tag
    limit: Limit
    params: tuple[int, int]  # (em_us, cap_us) for the decision script
    policy_item: str  # its RateLimit-Policy member


def _bucket(name: str, limit: Limit, prefix: str, suffix: Callable[[str, int, int], str]) -> Bucket:
    """``suffix``: :func:`keyschema.tier_suffix` or :func:`keyschema.rule_suffix`."""
    em, cap = limit.emission_us, limit.capacity_us
    return Bucket(name, prefix + name, suffix(name, em, cap), limit, (em, cap),
                  hdr.policy_item(prefix + name, limit))


@dataclass
class Enforcement:
    """One loaded policy with its API-key grants, ready for the hot path. ``grants`` None: the
    keys are resolved from their Redis grants (and cached, at most ``grant_cache_size``)."""

    policy: CompiledPolicy
    grants: Mapping[str, KeyGrant] | None
    version: int
    grant_cache_size: int = DEFAULT_GRANT_CACHE_SIZE
    grant_cache_max_age_s: float = DEFAULT_GRANT_CACHE_MAX_AGE_S
    cache: GrantCache[Bucket] | None = field(init=False, default=None)
    tier_args: Encoded | None = field(init=False, default=None)  # the resolve decision's tiers
    _own: dict[tuple[str, Limit], Bucket] = field(init=False, default_factory=dict)
    policy_id: str = field(init=False)
    label: str = field(init=False)  # the policy label of its metrics
    _prefix: str = field(init=False, default="")
    tiers: dict[str, Bucket] = field(init=False)
    rules: dict[str, Bucket] = field(init=False)
    peers: PeerTrust = field(init=False)

    def __post_init__(self) -> None:
        p = self.policy
        self.peers = PeerTrust(p.identify)
        self.policy_id = keyschema.policy_id(p.ref)
        # A cluster policy's buckets are named after it, so that a pod under two policies sends
        # distinct names in its headers even when both have a "free" tier.
        self._prefix = f"{p.name}/" if p.cluster_scoped else ""
        self.label = p.ref if p.cluster_scoped else p.name
        self.tiers = {t.name: _bucket(t.name, t.limit, self._prefix, keyschema.tier_suffix)
                      for t in p.tiers.values()}
        self.rules = {r.name: _bucket(r.name, r.limit, self._prefix, keyschema.rule_suffix)
                      for r in p.rules if r.limit is not None}
        if self.grants is None:
            self.cache = GrantCache(self.grant_cache_size, self.grant_cache_max_age_s)
            self.tier_args = tier_args(stored_grants.policy_tag(p.ref),
                                       ((name, b.suffix, *b.params) for name, b in self.tiers.items()))

    def grant_bucket(self, grant: KeyGrant) -> Bucket | None:
        """The bucket a Redis grant names: its tier's, or its own limit's (one Bucket per
        distinct limit, shared by every key that has it); None for a tier the policy no longer
        has (the key is unknown to it)."""
        tier_b = self.tiers.get(grant.tier)
        if tier_b is None or grant.limit is None:
            return tier_b
        own = (grant.tier, grant.limit)
        b = self._own.get(own)
        if b is None:
            if len(self._own) >= 4096:  # distinct own limits are few; bound them anyway
                self._own.clear()
            b = self._own[own] = _bucket(grant.tier, grant.limit, self._prefix, keyschema.tier_suffix)
        return b

    def carry_cache(self, old: Enforcement | None) -> None:
        """Take over ``old``'s grant cache when it still holds: the same policy (ref), the same
        tiers and keys in Redis grants both times. A reload for anything else (a rule, a
        selector, another policy of the namespace or a cluster policy scoped elsewhere) then
        leaves the cache as it was, instead of every sidecar re-resolving its hot keys at once."""
        if (old is not None and old.cache is not None and self.cache is not None
                and old.policy.ref == self.policy.ref and old.policy.tiers == self.policy.tiers):
            self.cache = old.cache


@dataclass(frozen=True, slots=True)
class _Plan:
    """One policy's part of a request: the buckets to take ``cost`` tokens from."""

    enforcement: Enforcement
    rule_name: str
    tier_b: Bucket
    cost: int
    keys: tuple[str, ...]
    params: tuple[int, ...]
    names: tuple[str, ...]
    limits: tuple[Limit, ...]
    policy_value: str


def _buckets(enforcement: Enforcement, rule_name: str, rule_b: Bucket | None, cost: int,
             tier_b: Bucket, client: str) -> _Plan:
    """The plan taking ``cost`` from ``client``'s ``tier_b`` bucket and its rule's."""
    tag = keyschema.client_tag_for(enforcement.policy_id, client)
    if rule_b is None:
        return _Plan(enforcement, rule_name, tier_b, cost, (tag + tier_b.suffix,), tier_b.params,
                     (tier_b.shown,), (tier_b.limit,), tier_b.policy_item)
    return _Plan(enforcement, rule_name, tier_b, cost, (tag + tier_b.suffix, tag + rule_b.suffix),
                 tier_b.params + rule_b.params, (tier_b.shown, rule_b.shown),
                 (tier_b.limit, rule_b.limit), f"{tier_b.policy_item}, {rule_b.policy_item}")


@dataclass(frozen=True, slots=True)
class _Resolve:
    """One policy's part of a request whose API key must be resolved from its Redis grant."""

    enforcement: Enforcement
    client: str  # the key's client id
    rule_name: str
    rule_b: Bucket | None
    cost: int
    fallback: _Plan  # the anonymous client's default-tier buckets (an unknown key, a failure)
    ticket: Ticket  # the cache's ticket for the key when the resolve was planned (GrantCache.put)


def _scaled(plan: _Plan) -> tuple[int, ...]:
    """``(cost x EM, CAP)`` per bucket: the plan's buckets as a cost-1 decision."""
    p = plan.params
    return tuple(x for i in range(0, len(p), 2) for x in (plan.cost * p[i], p[i + 1]))


@dataclass(slots=True)
class Outcome:
    """What to do with a request: ``forward`` it (adding ``headers`` to the upstream's response)
    or answer it now with ``status`` (a refusal: 401, 429, 503) and ``headers``."""

    forward: bool
    status: int  # 0 when forwarded: the upstream answers
    headers: list[tuple[str, str]]
    # A refusal's problem details: who refused (names) and why.
    policy_name: str = ""
    tier: str = ""
    rule: str = ""
    detail: str = ""


def forwarded(headers: list[tuple[str, str]]) -> Outcome:
    """Forward the request; ``headers`` go on the upstream's response."""
    return Outcome(True, 0, headers)


def refused(status: int, headers: list[tuple[str, str]], policy_name: str, tier: str = "",
            rule: str = "", detail: str = "") -> Outcome:
    """Answer the request now with ``status`` (401, 429, 503): who refused and why."""
    return Outcome(False, status, headers, policy_name, tier, rule, detail)


FORWARD_PLAIN = forwarded([])


class Limiter:
    def __init__(self, store: DecisionStore, metrics: Metrics, breaker: CircuitBreaker) -> None:
        self.store = store
        self.metrics = metrics
        self.breaker = breaker
        # Are the keys-changed notices heard? While they may not be (the subscription is down
        # or not up yet), no grant is taken from a cache: every key is resolved.
        self.notices = True
        # Grant-cache misses being resolved at once, and the cap (--max-key-resolves): beyond it
        # a miss is answered without Redis, so a flood of random keys asks Redis at most this
        # much beyond the ordinary decisions.
        self.resolving = 0
        self.max_resolves = DEFAULT_MAX_KEY_RESOLVES
        self.policy: Enforcement | None = None  # the namespace's RateLimitPolicy
        self.cluster_policy: Enforcement | None = None  # a ClusterRateLimitPolicy's shared budget
        self._hist = metrics.decision_seconds.labels(store.name)

    def trusts(self, peer: str) -> bool:
        """Is ``peer`` one of the trusted proxies of the pod's own (first) policy?"""
        first = self.policy or self.cluster_policy
        return first is not None and first.peers.verdict(peer)[0]

    async def decide(self, method: str, path: str, headers: MultiMapping[str], peer: str) -> Outcome:
        policy, cluster_policy = self.policy, self.cluster_policy
        if cluster_policy is None or policy is None:
            one = policy or cluster_policy
            if one is None:
                self.metrics.decision("", "", "", "unconfigured")
                return FORWARD_PLAIN
            plan = self._plan(one, method, path, headers, peer)
            if isinstance(plan, _Plan):
                return await self._decide_one(plan)
            return await self._resolve_and_decide(plan) if isinstance(plan, _Resolve) else plan
        first = self._plan(policy, method, path, headers, peer)
        second = self._plan(cluster_policy, method, path, headers, peer)
        if isinstance(first, _Resolve):
            first = await self._settle(first)
        if isinstance(second, _Resolve):
            if isinstance(first, Outcome) and not first.forward:
                return first  # refused by the namespace's policy: no need to know the key
            second = await self._settle(second)
        return await self._decide_both(first, second)

    async def _decide_both(self, first: _Plan | Outcome, second: _Plan | Outcome) -> Outcome:
        """A pod under its namespace's policy and a cluster policy: the request must pass both."""
        if isinstance(first, Outcome) or isinstance(second, Outcome):
            if isinstance(first, Outcome) and not first.forward:
                return first  # 401 by the namespace's policy
            if isinstance(second, Outcome) and not second.forward:
                return second  # 401 by the cluster policy: nothing was taken
            plan = first if isinstance(first, _Plan) else second
            if not isinstance(plan, _Plan):
                return FORWARD_PLAIN  # both skip
            return await self._decide_one(plan)
        keys = first.keys + second.keys
        shadow = Mode.SHADOW in (first.enforcement.policy.mode, second.enforcement.policy.mode)
        if not shadow and self.store.atomic(keys):
            return await self._decide_atomically(first, second, keys)
        # Two calls (different Redis Cluster slots, or a shadow policy, which must not hold the
        # other back): the namespace's policy first, the shared budget only if it admitted.
        reply = await self._ask(first.keys, first.cost, first.params)
        one = self._finish(first, reply)
        if not one.forward:
            return one
        two = await self._decide_one(second)
        if not two.forward:
            if reply is not None and reply.allowed:
                # Refused after all: give the first policy its tokens back (a refund cannot be
                # refused; if Redis cannot take it, those tokens stay spent).
                await self._ask(first.keys, -first.cost, first.params)
            return two
        return forwarded(hdr.merge(one.headers, two.headers))

    async def _decide_atomically(self, first: _Plan, second: _Plan, keys: tuple[str, ...]) -> Outcome:
        """Both policies' buckets in one script call, all-or-nothing. Each bucket's cost is
        folded into its EM (the script only ever uses cost x EM), so one call serves two costs;
        each policy's decision is then expanded from its debts with its own cost and EM."""
        params = _scaled(first) + _scaled(second)
        both = await self._ask(keys, 1, params)
        if both is None:
            one, two = self._finish(first, None), self._finish(second, None)
            return one if not one.forward else two if not two.forward else FORWARD_PLAIN
        allowed, debts = both
        n = len(first.keys)
        r1, r2 = Reply(allowed, debts[:n]), Reply(allowed, debts[n:])
        if allowed:
            one, two = self._finish(first, r1), self._finish(second, r2)
            return forwarded(hdr.merge(one.headers, two.headers))
        # Refused: by the first policy whose buckets lack room (the other took nothing either).
        if expand(r1, first.cost, first.params).short_bucket(first.cost) is not None:
            return self._finish(first, r1)
        return self._finish(second, r2)

    async def _decide_one(self, plan: _Plan) -> Outcome:
        return self._finish(plan, await self._ask(plan.keys, plan.cost, plan.params))

    def _plan(self, enforcement: Enforcement, method: str, path: str, headers: MultiMapping[str],
              peer: str) -> _Plan | _Resolve | Outcome:
        """Who the client is and which buckets the request takes from; or the answer already
        (a skipped route, a missing or unknown required key); or, for a key whose grant must be
        read from Redis first, what to resolve."""
        policy = enforcement.policy
        rule = policy.match_rule(method, path)
        rule_name = rule.name if rule is not None else ""
        if rule is not None and rule.skip:
            self.metrics.decision(enforcement.label, "", rule_name, "skipped")
            return FORWARD_PLAIN
        cost = rule.cost if rule is not None else 1
        rule_b = enforcement.rules.get(rule_name) if rule is not None else None

        keyed = False
        client = ""
        tier_b: Bucket | None = None
        if Source.API_KEY in policy.identify.order:
            key = api_key_from(headers, policy.api_keys.header)
            if key is not None:
                keyed = True
                raw = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
                grants = enforcement.grants
                if grants is None:  # resolved from Redis grants, through the cache
                    client = keyschema.client_for_api_key(raw)
                    assert enforcement.cache is not None
                    hit = enforcement.cache.get(client) if self.notices else None
                    if hit is None:
                        return self._resolving(enforcement, client, rule_name, rule_b, cost, headers, peer)
                    tier_b = hit if isinstance(hit, Bucket) else None  # or UNKNOWN
                else:
                    digest = raw.hex()
                    grant = grants.get(digest)
                    if grant is not None:
                        client = keyschema.client_for_api_key(raw)
                        tier_b = enforcement.grant_bucket(grant)
        if tier_b is None:
            if policy.api_keys.required:
                return self._unauthorized(enforcement, rule_name, keyed)
            # Unknown keys are not identities: an attacker rotating random keys would otherwise
            # get a fresh bucket per key (and flood Redis with keys).
            client = anonymous_client(headers, peer, enforcement.peers)
            tier_b = enforcement.tiers[policy.default_tier]
        return _buckets(enforcement, rule_name, rule_b, cost, tier_b, client)

    def _unauthorized(self, enforcement: Enforcement, rule_name: str, keyed: bool) -> Outcome:
        """401: the policy requires a key, and none (``keyed`` False) or an unknown one came."""
        policy = enforcement.policy
        self.metrics.decision(enforcement.label, "", rule_name, "unauthorized")
        return refused(401, [("WWW-Authenticate", f'ApiKey header="{policy.api_keys.header}"')],
                       policy.name, detail="the API key is not known" if keyed
                       else "a valid API key is required")

    def _resolving(self, enforcement: Enforcement, client: str, rule_name: str, rule_b: Bucket | None,
                   cost: int, headers: MultiMapping[str], peer: str) -> _Resolve:
        """A key the cache does not know: resolve its grant (with the anonymous client's
        default-tier buckets as the fallback for an unknown key, and to name a failure; where a
        key is required they only name a failure: the key's own client stands in)."""
        policy = enforcement.policy
        fallback = _buckets(enforcement, rule_name, rule_b, cost, enforcement.tiers[policy.default_tier],
                            client if policy.api_keys.required
                            else anonymous_client(headers, peer, enforcement.peers))
        assert enforcement.cache is not None
        return _Resolve(enforcement, client, rule_name, rule_b, cost, fallback, enforcement.cache.ticket(client))

    @staticmethod
    def _ask_resolve(r: _Resolve, cost: int) -> ResolveAsk:
        """The resolve decision for ``r``'s key and rule bucket (no fallback buckets)."""
        e = r.enforcement
        assert e.tier_args is not None
        tag = keyschema.client_tag_for(e.policy_id, r.client)
        rule_keys, rule_params = ((tag + r.rule_b.suffix,), r.rule_b.params) if r.rule_b else ((), ())
        return ResolveAsk(keyschema.grant_key(e.policy_id, r.client), cost, rule_keys, rule_params,
                          (), (), e.tier_args)

    async def _resolve_and_decide(self, r: _Resolve) -> Outcome:
        """One policy, a key the cache does not know: resolve and decide in one call. An unknown
        key takes the fallback buckets in that call where the store can (one node), else in a
        second call; with ``required`` it is refused (nothing was written)."""
        e, fb = r.enforcement, r.fallback
        required = e.policy.api_keys.required
        if self.resolving >= self.max_resolves:
            return self._busy(r) if required else await self._decide_one(fb)
        ask = self._ask_resolve(r, r.cost)
        if not required and self.store.atomic((ask.grant_key, *fb.keys)):
            ask = ask._replace(fallback_keys=fb.keys, fallback_params=fb.params)
        resolved = await self._resolve(ask)
        if resolved is None:
            return self._unresolved(r)
        tier_b = self._learn(r, resolved.grant)
        if tier_b is not None and resolved.reply is not None:
            return self._finish(_buckets(e, r.rule_name, r.rule_b, r.cost, tier_b, r.client), resolved.reply)
        if required:
            return self._unauthorized(e, r.rule_name, True)
        if resolved.grant is None and resolved.reply is not None:
            return self._finish(fb, resolved.reply)  # decided in the same call
        return await self._decide_one(fb)

    async def _settle(self, r: _Resolve) -> _Plan | Outcome:
        """A pod under two policies: resolve the key first, reading only (cost 0: nothing is
        taken or written), then decide as for a cached key."""
        e = r.enforcement
        if self.resolving >= self.max_resolves:
            return self._busy(r) if e.policy.api_keys.required else r.fallback
        resolved = await self._resolve(self._ask_resolve(r, 0))
        if resolved is None:
            return self._unresolved(r)
        tier_b = self._learn(r, resolved.grant)
        if tier_b is not None:
            return _buckets(e, r.rule_name, r.rule_b, r.cost, tier_b, r.client)
        if e.policy.api_keys.required:
            return self._unauthorized(e, r.rule_name, True)
        return r.fallback

    def _busy(self, r: _Resolve) -> Outcome:
        """A required key not cached while --max-key-resolves are in flight: 503, not asked."""
        e = r.enforcement
        self.metrics.decision(e.label, "", r.rule_name, "failed_closed")
        return refused(503, [("Retry-After", "1")], e.policy.name, rule=r.rule_name,
                       detail="the rate limiter is checking too many API keys right now")

    def _unresolved(self, r: _Resolve) -> Outcome:
        """The store could not resolve the key. One the cache knew, however long ago, counts as
        it was then (the last good state). Otherwise, where a key is required, 503 whatever the
        failure mode: a key that could not be checked is never forwarded (else a flood that
        slows Redis down would get random keys past the requirement). Otherwise the policy's
        failure mode answers, as for the anonymous client the key may turn out to be."""
        e = r.enforcement
        assert e.cache is not None
        last = e.cache.last(r.client)  # the last good state: a key known before stays known
        if isinstance(last, Bucket):
            return self._finish(_buckets(e, r.rule_name, r.rule_b, r.cost, last, r.client), None)
        if not e.policy.api_keys.required:
            return self._finish(r.fallback, None)
        if last is not None:
            return self._unauthorized(e, r.rule_name, True)
        self.metrics.decision(e.label, "", r.rule_name, "failed_closed")
        return refused(503, [("Retry-After", "1")], e.policy.name, rule=r.rule_name,
                       detail="the rate limiter cannot check the API key right now")

    def _learn(self, r: _Resolve, value: str | None) -> Bucket | None:
        """The bucket a resolved grant names (None: an unknown key), cached."""
        e = r.enforcement
        bucket, expires_ms = None, 0
        if value is not None:
            try:
                stored = stored_grants.decode(value, e.policy.ref)
            except ValueError as exc:  # says what is wrong, never the value
                log.warning("an API key grant of %s is unreadable; the key counts as unknown: %s",
                            e.policy.ref, exc)
            else:
                bucket, expires_ms = e.grant_bucket(stored.grant), stored.expires_ms
        assert e.cache is not None
        e.cache.put(r.client, bucket, expires_ms, r.ticket)
        self.metrics.grant_resolved(e.label, "known" if bucket else "unknown")
        return bucket

    def notices_up(self, up: bool) -> None:
        """The keys-changed notices are heard (``up``; the caches were emptied as the
        subscription came) or may not be: then every key is resolved, the caches serving only
        as the last good state when Redis cannot resolve it."""
        self.notices = up

    def forget_grants(self, policy_id: str | None, client: str | None) -> None:
        """A keys-changed notice: drop one key's cached grant (``client``) or all of a policy's
        (None); ``policy_id`` None: of every policy (the notices may have been missed)."""
        for e in (self.policy, self.cluster_policy):
            if e is not None and e.cache is not None and policy_id in (None, e.policy_id):
                if client is None:
                    e.cache.clear()
                else:
                    e.cache.drop(client)

    def _finish(self, plan: _Plan, reply: Reply | None) -> Outcome:
        """The answer for one policy from the store's reply (None: it could not decide)."""
        enforcement, tier_b, rule_name = plan.enforcement, plan.tier_b, plan.rule_name
        policy = enforcement.policy
        if reply is None:  # store unavailable
            if policy.failure_mode is FailureMode.CLOSED and policy.mode is Mode.ENFORCE:
                self.metrics.decision(enforcement.label, tier_b.name, rule_name, "failed_closed")
                return refused(503, [("Retry-After", "1")], policy.name, tier_b.name, rule_name,
                               "the rate limiter cannot decide right now")
            self.metrics.decision(enforcement.label, tier_b.name, rule_name, "failed_open")
            return FORWARD_PLAIN
        decision = expand(reply, plan.cost, plan.params)
        out_headers = hdr.build(policy.headers, plan.names, plan.limits, plan.policy_value, decision,
                                plan.cost)
        if decision.allowed:
            self.metrics.decision(enforcement.label, tier_b.name, rule_name, "allowed")
            return forwarded(out_headers)
        if policy.mode is Mode.SHADOW:
            self.metrics.decision(enforcement.label, tier_b.name, rule_name, "shadow_limited")
            return forwarded(out_headers if policy.headers is not HeaderStyle.NONE else [])
        self.metrics.decision(enforcement.label, tier_b.name, rule_name, "limited")
        retry_after = hdr.retry_after(decision)
        out_headers.append(("Retry-After", retry_after))
        limiting = plan.names[decision.short_bucket(plan.cost) or 0]
        return refused(429, out_headers, policy.name, tier_b.name, rule_name,
                       f"the {limiting} limit is used up; retry after {retry_after} s")

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

    async def _ask(self, keys: tuple[str, ...], cost: int, params: tuple[int, ...]) -> Reply | None:
        breaker = self.breaker
        if not breaker.allow():
            self.metrics.store_errors.labels(self.store.name, "circuit_open").inc()
            return None
        started = time.perf_counter()
        try:
            reply = await self.store.decide(keys, cost, params)
        except StoreUnavailable as exc:
            self._failed(exc)
            return None
        breaker.success()
        self._hist.observe(time.perf_counter() - started)
        return reply

    def _failed(self, exc: StoreUnavailable) -> None:
        # The breaker logs (at ERROR, once per change of reason) what switches limiting off.
        self.breaker.failure(exc)
        self.metrics.store_errors.labels(self.store.name, exc.reason).inc()
        log.debug("decision store failed: %s", exc)

