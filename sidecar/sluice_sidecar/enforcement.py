"""A loaded policy as the hot path uses it, and what a decision plans and answers: the types
the limiter (:mod:`sluice_sidecar.limiter`) and the API-key resolver
(:mod:`sluice_sidecar.keyresolve`) share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from sluice_core import grants as stored_grants
from sluice_core import keyschema
from sluice_core.model import CompiledPolicy, KeyGrant, Limit
from sluice_core.sidecar_settings import DEFAULT_GRANT_CACHE_MAX_AGE_S, DEFAULT_GRANT_CACHE_SIZE

from sluice_sidecar import headers as hdr
from sluice_sidecar.grantcache import GrantCache
from sluice_sidecar.identify import PeerTrust
from sluice_sidecar.stores.base import tier_args
from sluice_sidecar.transport.resp import Encoded


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


class Granted(NamedTuple):
    """What the grant cache holds for a known API key: its bucket, and its id (usage reports
    name the key by it, never by the key)."""

    bucket: Bucket
    key_id: str


@dataclass
class Enforcement:
    """One loaded policy with its API-key grants, ready for the hot path. ``grants`` None: the
    keys are resolved from their Redis grants (and cached, at most ``grant_cache_size``)."""

    policy: CompiledPolicy
    grants: Mapping[str, KeyGrant] | None
    version: int
    grant_cache_size: int = DEFAULT_GRANT_CACHE_SIZE
    grant_cache_max_age_s: float = DEFAULT_GRANT_CACHE_MAX_AGE_S
    cache: GrantCache[Granted] | None = field(init=False, default=None)
    tier_args: Encoded | None = field(init=False, default=None)  # the resolve decision's tiers
    _own: dict[tuple[str, Limit], Bucket] = field(init=False, default_factory=dict)
    policy_id: str = field(init=False)
    label: str = field(init=False)  # the policy label of its metrics
    _prefix: str = field(init=False, default="")
    tiers: dict[str, Bucket] = field(init=False)
    rules: dict[str, Bucket] = field(init=False)
    usage_ref: str = field(init=False)  # the policy as usage reports name it (usage.UsageRow.policy)
    peers: PeerTrust = field(init=False)

    def __post_init__(self) -> None:
        p = self.policy
        self.peers = PeerTrust(p.identify)
        self.policy_id = keyschema.policy_id(p.ref)
        # A cluster policy's buckets are named after it, so that a pod under two policies sends
        # distinct names in its headers even when both have a "free" tier.
        self._prefix = f"{p.name}/" if p.cluster_scoped else ""
        self.label = p.ref if p.cluster_scoped else p.name
        self.usage_ref = p.name if p.cluster_scoped else p.ref
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
class Plan:
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
    client: str  # the bucket client id (keyschema)
    key_id: str  # an API key's id for usage reports, "" for other clients


def plan_buckets(enforcement: Enforcement, rule_name: str, rule_b: Bucket | None, cost: int,
             tier_b: Bucket, client: str, key_id: str = "") -> Plan:
    """The plan taking ``cost`` from ``client``'s ``tier_b`` bucket and its rule's (``key_id``:
    an API key client's id, for usage reports)."""
    tag = keyschema.client_tag_for(enforcement.policy_id, client)
    if rule_b is None:
        return Plan(enforcement, rule_name, tier_b, cost, (tag + tier_b.suffix,), tier_b.params,
                     (tier_b.shown,), (tier_b.limit,), tier_b.policy_item, client, key_id)
    return Plan(enforcement, rule_name, tier_b, cost, (tag + tier_b.suffix, tag + rule_b.suffix),
                 tier_b.params + rule_b.params, (tier_b.shown, rule_b.shown),
                 (tier_b.limit, rule_b.limit), f"{tier_b.policy_item}, {rule_b.policy_item}", client, key_id)


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
