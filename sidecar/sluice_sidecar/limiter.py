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
run; in between, the client's own budget is held for one round trip), and the request counts
(metrics, usage) under the refusing policy only, as it does after one atomic call.
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

from multidict import MultiMapping
from sluice_core import keyschema
from sluice_core.gcra import Reply, expand
from sluice_core.grants import default_key_id
from sluice_core.model import (
    FailureMode,
    HeaderStyle,
    Mode,
    Source,
)
from sluice_core.sidecar_settings import (
    DEFAULT_MAX_KEY_RESOLVES,
)

from sluice_sidecar import headers as hdr
from sluice_sidecar.breaker import CircuitBreaker
from sluice_sidecar.enforcement import (
    FORWARD_PLAIN,
    Bucket,
    Enforcement,
    Granted,
    Outcome,
    Plan,
    forwarded,
    plan_buckets,
    refused,
)
from sluice_sidecar.identify import anonymous_client, api_key_from
from sluice_sidecar.keyresolve import KeyResolving, Resolve
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.stores.base import DecisionStore, StoreUnavailable
from sluice_sidecar.usage_note import UsageNote

log = logging.getLogger("sluice.limiter")


def _scaled(plan: Plan) -> tuple[int, ...]:
    """``(cost x EM, CAP)`` per bucket: the plan's buckets as a cost-1 decision."""
    p = plan.params
    return tuple(x for i in range(0, len(p), 2) for x in (plan.cost * p[i], p[i + 1]))


class Limiter(KeyResolving):
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

    async def decide(self, method: str, path: str, headers: MultiMapping[str], peer: str,
                     note: UsageNote | None = None) -> Outcome:
        """The answer for a request; with ``note`` (usage on), each policy's decision is appended
        to ``note`` where it is counted in Prometheus."""
        policy, cluster_policy = self.policy, self.cluster_policy
        if cluster_policy is None or policy is None:
            one = policy or cluster_policy
            if one is None:
                self.metrics.decision("", "", "", "unconfigured")
                self._note(note, "", False, "", "", "skipped")
                return FORWARD_PLAIN
            plan = self._plan(one, method, path, headers, peer, note)
            if isinstance(plan, Plan):
                return await self._decide_one(plan, note)
            return await self._resolve_and_decide(plan, note) if isinstance(plan, Resolve) else plan
        first = self._plan(policy, method, path, headers, peer, note)
        second = self._plan(cluster_policy, method, path, headers, peer, note)
        if isinstance(first, Resolve):
            first = await self._settle(first, note)
        if isinstance(second, Resolve):
            if isinstance(first, Outcome) and not first.forward:
                return first  # refused by the namespace's policy: no need to know the key
            second = await self._settle(second, note)
        return await self._decide_both(first, second, note)

    async def _decide_both(self, first: Plan | Outcome, second: Plan | Outcome,
                           note: UsageNote | None) -> Outcome:
        """A pod under its namespace's policy and a cluster policy: the request must pass both."""
        if isinstance(first, Outcome) or isinstance(second, Outcome):
            if isinstance(first, Outcome) and not first.forward:
                return first  # 401 by the namespace's policy
            if isinstance(second, Outcome) and not second.forward:
                return second  # 401 by the cluster policy: nothing was taken
            plan = first if isinstance(first, Plan) else second
            if not isinstance(plan, Plan):
                return FORWARD_PLAIN  # both skip
            return await self._decide_one(plan, note)
        keys = first.keys + second.keys
        shadow = Mode.SHADOW in (first.enforcement.policy.mode, second.enforcement.policy.mode)
        if not shadow and self.store.atomic(keys):
            return await self._decide_atomically(first, second, keys, note)
        # Two calls (different Redis Cluster slots, or a shadow policy, which must not hold the
        # other back): the namespace's policy first, the shared budget only if it admitted.
        # The first decision is counted once the second is known: a request the shared budget
        # refuses counts under the policy that refused it only, as in one atomic call.
        reply = await self._ask(first.keys, first.cost, first.params)
        one, said, taken = self._judge(first, reply)
        if not one.forward:
            self._counted(first, said, taken, note)
            return one
        two = await self._decide_one(second, note)
        if not two.forward and reply is not None and reply.allowed:
            # Refused after all: give the first policy its tokens back (a refund cannot be
            # refused; if Redis cannot take it, those tokens stay spent) and withdraw its
            # "allowed" (shadow_limited or failed_open stand: nothing was taken to give back).
            await self._ask(first.keys, -first.cost, first.params)
            return two
        self._counted(first, said, taken, note)
        return two if not two.forward else forwarded(hdr.merge(one.headers, two.headers))

    async def _decide_atomically(self, first: Plan, second: Plan, keys: tuple[str, ...],
                                 note: UsageNote | None) -> Outcome:
        """Both policies' buckets in one script call, all-or-nothing. Each bucket's cost is
        folded into its EM (the script only ever uses cost x EM), so one call serves two costs;
        each policy's decision is then expanded from its debts with its own cost and EM."""
        params = _scaled(first) + _scaled(second)
        both = await self._ask(keys, 1, params)
        if both is None:
            one, two = self._finish(first, None, note), self._finish(second, None, note)
            return one if not one.forward else two if not two.forward else FORWARD_PLAIN
        allowed, debts = both
        n = len(first.keys)
        r1, r2 = Reply(allowed, debts[:n]), Reply(allowed, debts[n:])
        if allowed:
            one, two = self._finish(first, r1, note), self._finish(second, r2, note)
            return forwarded(hdr.merge(one.headers, two.headers))
        # Refused: by the first policy whose buckets lack room (the other took nothing either).
        if expand(r1, first.cost, first.params).short_bucket(first.cost) is not None:
            return self._finish(first, r1, note)
        return self._finish(second, r2, note)

    async def _decide_one(self, plan: Plan, note: UsageNote | None) -> Outcome:
        return self._finish(plan, await self._ask(plan.keys, plan.cost, plan.params), note)

    def _plan(self, enforcement: Enforcement, method: str, path: str, headers: MultiMapping[str],
              peer: str, note: UsageNote | None) -> Plan | Resolve | Outcome:
        """Who the client is and which buckets the request takes from; or the answer already
        (a skipped route, a missing or unknown required key); or, for a key whose grant must be
        read from Redis first, what to resolve."""
        policy = enforcement.policy
        rule = policy.match_rule(method, path)
        rule_name = rule.name if rule is not None else ""
        if rule is not None and rule.skip:
            self._count(enforcement, "", rule_name, "skipped", note)
            return FORWARD_PLAIN
        cost = rule.cost if rule is not None else 1
        rule_b = enforcement.rules.get(rule_name) if rule is not None else None

        keyed = False
        client = key_id = ""
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
                    if isinstance(hit, Granted):  # else UNKNOWN
                        tier_b, key_id = hit
                else:
                    digest = raw.hex()
                    grant = grants.get(digest)
                    if grant is not None:
                        client = keyschema.client_for_api_key(raw)
                        tier_b = enforcement.grant_bucket(grant)
                        key_id = grant.key_id or default_key_id(digest)
        if tier_b is None:
            if policy.api_keys.required:
                return self._unauthorized(enforcement, rule_name, keyed, note)
            # Unknown keys are not identities: an attacker rotating random keys would otherwise
            # get a fresh bucket per key (and flood Redis with keys).
            client, key_id = anonymous_client(headers, peer, enforcement.peers), ""
            tier_b = enforcement.tiers[policy.default_tier]
        return plan_buckets(enforcement, rule_name, rule_b, cost, tier_b, client, key_id)

    def _unauthorized(self, enforcement: Enforcement, rule_name: str, keyed: bool,
                      note: UsageNote | None) -> Outcome:
        """401: the policy requires a key, and none (``keyed`` False) or an unknown one came."""
        policy = enforcement.policy
        self._count(enforcement, "", rule_name, "unauthorized", note)
        return refused(401, [("WWW-Authenticate", f'ApiKey header="{policy.api_keys.header}"')],
                       policy.name, detail="the API key is not known" if keyed
                       else "a valid API key is required")

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

    def _finish(self, plan: Plan, reply: Reply | None, note: UsageNote | None) -> Outcome:
        """The answer for one policy from the store's reply (None: it could not decide), counted."""
        outcome, said, taken = self._judge(plan, reply)
        self._counted(plan, said, taken, note)
        return outcome

    @staticmethod
    def _judge(plan: Plan, reply: Reply | None) -> tuple[Outcome, str, int]:
        """:meth:`_finish` before counting: the answer, its usage outcome and the tokens taken."""
        enforcement, tier_b, rule_name = plan.enforcement, plan.tier_b, plan.rule_name
        policy = enforcement.policy
        if reply is None:  # store unavailable
            if policy.failure_mode is FailureMode.CLOSED and policy.mode is Mode.ENFORCE:
                return refused(503, [("Retry-After", "1")], policy.name, tier_b.name, rule_name,
                               "the rate limiter cannot decide right now"), "failed_closed", 0
            return FORWARD_PLAIN, "failed_open", 0
        decision = expand(reply, plan.cost, plan.params)
        out_headers = hdr.build(policy.headers, plan.names, plan.limits, plan.policy_value, decision,
                                plan.cost)
        if decision.allowed:
            return forwarded(out_headers), "allowed", plan.cost
        if policy.mode is Mode.SHADOW:
            return forwarded(out_headers if policy.headers is not HeaderStyle.NONE else []), "shadow_limited", 0
        retry_after = hdr.retry_after(decision)
        out_headers.append(("Retry-After", retry_after))
        limiting = plan.names[decision.short_bucket(plan.cost) or 0]
        return refused(429, out_headers, policy.name, tier_b.name, rule_name,
                       f"the {limiting} limit is used up; retry after {retry_after} s"), "limited", 0

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

