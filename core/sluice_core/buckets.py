"""One client's buckets under one policy, read and reset in Redis: what ``sluice bucket`` and
the analytics API's bucket endpoints share.

The keys are spelled by :mod:`sluice_core.keyschema` from the policy as compiled (each tier's
bucket and each rule's own bucket, under the client's hash tag), so every key of one client lives
in one Redis Cluster slot: the read is one script call and the reset one ``DEL``. The state is
read with the decision script itself at cost 0 (its "peek": ``scripts/decide.lua`` reads the TAT,
takes nothing, writes nothing) so the stored TAT format and Redis's clock are interpreted in
exactly one place; :func:`sluice_core.gcra.expand` turns the debts into tokens and times.

Never logged here: a client id is a digest or an address, but callers decide what to print.
An API key granted a limit of its own (``limit`` on its Secret or keys-file entry) takes that
bucket instead of its tier's: its numbers live in the key's grant, so for a key client
(``k…``) the grant is read too (in Redis beside the buckets, else the config document's
embedded keys) and the bucket listed as kind ``own``, named by its tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import RedisError

from sluice_core import configstore, gcra, keyschema, scripts
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy, KeyGrant, Limit


class BucketError(LookupError):
    """The policy or the client could not be named (the message says which)."""


@dataclass(frozen=True)
class BucketKey:
    kind: str  # "tier" | "rule" | "own" (an API key's own limit)
    name: str  # the tier's or rule's name (an own limit: its tier's)
    key: str
    limit: Limit


@dataclass(frozen=True)
class BucketView:
    kind: str
    name: str
    capacity: int  # tokens when full (the burst)
    remaining: int  # whole tokens left now
    full_in_ms: int  # until full again (0: full; a missing key is a full bucket)
    next_token_in_ms: int  # until the next token (0: full)

    def as_dict(self) -> dict[str, str | int]:
        return {"kind": self.kind, "name": self.name, "capacity": self.capacity,
                "remaining": self.remaining, "full_in_ms": self.full_in_ms,
                "next_token_in_ms": self.next_token_in_ms}


def client_id(spec: str) -> str:
    """The bucket client id of ``spec``: ``ip:<address>`` (grouped as the sidecar groups it),
    ``header:<value>`` (hashed), ``api-key-sha256:<hex>`` (a key's SHA-256, never the key), or
    ``id:<client id>`` as found in a bucket key. ``BucketError`` names the accepted forms."""
    kind, sep, value = spec.partition(":")
    if not sep or not value:
        raise BucketError("client: expected ip:ADDRESS, header:VALUE, api-key-sha256:HEX or id:CLIENT_ID")
    if kind == "ip":
        return keyschema.client_for_ip(value)
    if kind == "header":
        return keyschema.client_for_header(value)
    if kind == "api-key-sha256":
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise BucketError("client: api-key-sha256 takes the 64 hex digits of the key's SHA-256")
        return keyschema.client_for_api_key(raw)
    if kind == "id":
        if "{" in value or "}" in value or len(value) > 256:
            raise BucketError("client: an id has no braces and at most 256 characters")
        return value
    raise BucketError("client: expected ip:ADDRESS, header:VALUE, api-key-sha256:HEX or id:CLIENT_ID")


def bucket_keys(policy: CompiledPolicy, client: str) -> list[BucketKey]:
    """Every bucket ``client`` may hold under ``policy``: one per tier, one per limited rule."""
    tag = keyschema.client_tag(policy.ref, client)
    out = [BucketKey("tier", t.name, keyschema.tier_bucket_key(tag, t.name, t.limit.emission_us,
                                                                t.limit.capacity_us), t.limit)
           for t in policy.tiers.values()]
    out += [BucketKey("rule", r.name, keyschema.rule_bucket_key(tag, r.name, r.limit.emission_us,
                                                                r.limit.capacity_us), r.limit)
            for r in policy.rules if r.limit is not None]
    return out


async def own_limit(client: configstore.Client, policy: CompiledPolicy, client_id_: str) -> BucketKey | None:
    """The own-limit bucket of an API key client (``k…``) under ``policy``, if its grant gives
    it one. The grant is found where the sidecars find it: in the policy's config document when
    that embeds the policy's keys (a digest whose client id is ``client_id_``), else in Redis
    beside the buckets (one GET in the client's slot). None for any other client, a key without
    a grant, or a grant of its tier's bucket."""
    if not client_id_.startswith("k"):
        return None
    grant: KeyGrant | None = None
    config = await configstore.read(client, policy.namespace)
    embedded = config.grants.get(policy.name) if config is not None else None
    if embedded is not None:
        grant = next((g for digest, g in embedded.items() if _key_client(digest) == client_id_), None)
    else:
        try:
            stored = await configstore.get_grant_of(client, policy.ref, client_id_)
        except ValueError:  # damaged, or written for another policy: the sidecars ignore it too
            stored = None
        grant = stored.grant if stored is not None else None
    if grant is None or grant.limit is None:
        return None
    lim = grant.limit
    key = keyschema.tier_bucket_key(keyschema.client_tag(policy.ref, client_id_), grant.tier,
                                    lim.emission_us, lim.capacity_us)
    return BucketKey("own", grant.tier, key, lim)


def _key_client(digest: str) -> str | None:
    """The client id of an embedded key's digest (None for one that is not 64 hex digits)."""
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        return None
    return keyschema.client_for_api_key(raw) if len(raw) == 32 else None


async def client_buckets(client: configstore.Client, policy: CompiledPolicy, client_id_: str) -> list[BucketKey]:
    """:func:`bucket_keys`, and an API key's own-limit bucket (:func:`own_limit`) first."""
    own = await own_limit(client, policy, client_id_)
    return ([own] if own is not None else []) + bucket_keys(policy, client_id_)


async def find_policy(client: configstore.Client, namespace: str, name: str) -> CompiledPolicy:
    """The policy as the sidecars run it (the namespace's config document in Redis); for a
    ClusterRateLimitPolicy pass the namespace ``_cluster``."""
    config = await configstore.read(client, namespace)
    for p in config.policies if config is not None else ():
        if p.name == name:
            return p
    where = "the cluster scope" if namespace == CLUSTER_SCOPE else f"namespace {namespace!r}"
    raise BucketError(f"policy: no policy {name!r} in {where}'s config in Redis")


async def read(client: configstore.Client, policy: CompiledPolicy, client_id_: str) -> list[BucketView]:
    """The client's buckets now, read by the decision script at cost 0 (writes nothing)."""
    keys = await client_buckets(client, policy, client_id_)
    if not keys:
        return []
    params = [v for k in keys for v in (k.limit.emission_us, k.limit.capacity_us)]
    script = scripts.decide()
    try:
        reply = await client.redis.eval(script.source, len(keys), *(k.key for k in keys),
                                        1, len(keys), 0, *params)
    except RedisError as exc:
        raise configstore.ConfigStoreError(f"cannot read buckets of policy {policy.ref}: {exc}") from exc
    debts = [int(d) for d in reply[1:]]
    decision = gcra.expand(gcra.Reply(bool(reply[0]), debts), 0, params)
    return [BucketView(k.kind, k.name, k.limit.burst, min(b.remaining, k.limit.burst),
                       -(-b.full_us // 1000), -(-b.next_us // 1000))
            for k, b in zip(keys, decision.buckets, strict=True)]


async def reset(client: configstore.Client, policy: CompiledPolicy, client_id_: str) -> int:
    """Delete the client's buckets under ``policy`` (a missing key is a full bucket); the number
    of keys that existed. One ``DEL``: the keys share one hash tag, so one slot. The key's grant
    is not touched: only what it has used."""
    keys = await client_buckets(client, policy, client_id_)
    if not keys:
        return 0
    try:
        return int(await client.redis.delete(*(k.key for k in keys)))
    except RedisError as exc:
        raise configstore.ConfigStoreError(f"cannot reset buckets of policy {policy.ref}: {exc}") from exc
