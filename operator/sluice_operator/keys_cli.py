"""``sluice keys``: API keys as Kubernetes Secrets (see :mod:`sluice_operator.keysecrets`).

- ``create --policy P --tier T [-n NS] [--limit 100/1m] [--expires-at RFC3339]``: a Secret with a
  fresh key (256 bits from the OS CSPRNG, ``sk_<tier>_`` prefix), printed once and never again.
  The policy must exist and have the tier (read from the API server): a key for a missing policy
  or tier would be created and then silently never work.
  ``--cluster-policy P`` instead: a key of a ClusterRateLimitPolicy, kept in the operator's
  cluster-keys namespace (``-n``, default ``$SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE``, else
  ``sluice-system``: the operator's own default).
- ``list [--policy P | --cluster-policy P] [-n NS]``: names, tiers, state — never the keys.
- ``revoke NAME [-n NS]``: ``disabled: "true"``; the Secret (the audit trail) stays.
- ``rotate NAME [-n NS] [--grace 1h]``: a new key for the same policy and tier; the old one is
  revoked at once, or expires after the grace period.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import secrets
import sys
from typing import Any

from sluice_core.duration import parse_duration_us
from sluice_core.model import API_VERSION
from sluice_core.parse import parse_limit_text

from sluice_operator.keysecrets import CLUSTER_POLICY_LABEL, POLICY_LABEL
from sluice_operator.kube import default_api_client
from sluice_operator.settings import CLUSTER_KEYS_NAMESPACE

KEY_LABEL = "sluice.dev/api-key"


def new_key(tier: str) -> str:
    return f"sk_{tier}_{secrets.token_urlsafe(32)}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: dict[str, str] | None, name: str) -> str | None:
    raw = (data or {}).get(name)
    return base64.b64decode(raw).decode() if raw else None


def secret_manifest(namespace: str, policy: str, tier: str, key: str, *, limit: str | None = None,
                    expires_at: str | None = None, name: str | None = None,
                    label: str = POLICY_LABEL) -> dict[str, Any]:
    data = {"key": key, "tier": tier}
    if limit:
        parse_limit_text(limit)  # refuse a bad limit before anything is created
        data["limit"] = limit
    if expires_at:
        data["expiresAt"] = expires_at
    meta: dict[str, Any] = {"namespace": namespace, "labels": {label: policy, KEY_LABEL: "true"}}
    meta["name"] = name or f"{policy}-{tier}-{secrets.token_hex(3)}"
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta,
            "data": {k: _b64(v) for k, v in data.items()}}


HELP = "create, list, revoke and rotate API keys kept in Secrets"  # one line in `sluice --help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a key Secret and print the key once")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="a RateLimitPolicy in -n")
    which.add_argument("--cluster-policy", help="a ClusterRateLimitPolicy (-n: the operator's "
                                                "cluster-keys namespace, default "
                                                "$SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE or "
                                                f"{CLUSTER_KEYS_NAMESPACE})")
    c.add_argument("--tier", required=True)
    c.add_argument("--limit", help="this key's own limit, <requests>/<period>[/<burst>]")
    c.add_argument("--expires-at", help="RFC 3339 time the key stops working")
    ls = sub.add_parser("list", help="list key Secrets (never the keys)")
    lwhich = ls.add_mutually_exclusive_group()
    lwhich.add_argument("--policy")
    lwhich.add_argument("--cluster-policy")
    r = sub.add_parser("revoke", help="disable a key, keeping its Secret")
    r.add_argument("name")
    ro = sub.add_parser("rotate", help="issue a new key for the same policy and tier")
    ro.add_argument("name")
    ro.add_argument("--grace", help="keep the old key working this long (e.g. 1h); default: revoke now")
    for p in (c, ls, r, ro):
        p.add_argument("-n", "--namespace", help="default: default (the cluster-keys namespace "
                                                 "with --cluster-policy)")


def cluster_keys_namespace() -> str:
    """Where the operator looks for cluster keys: its env var when set here too, else its default."""
    return os.environ.get("SLUICE_OPERATOR_CLUSTER_KEYS_NAMESPACE") or CLUSTER_KEYS_NAMESPACE


def _api() -> Any:
    from kubernetes import client

    return client.CoreV1Api(default_api_client())


def check_tier(api: Any, policy: str, tier: str, *, namespace: str, cluster: bool) -> None:
    """Refuse (ValueError) a key for a policy the API server does not have, or a tier it lacks."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    group, version = API_VERSION.split("/")
    custom = client.CustomObjectsApi(api.api_client)
    kind = "ClusterRateLimitPolicy" if cluster else "RateLimitPolicy"
    where = "" if cluster else f" in namespace {namespace}"
    obj: Any
    try:
        if cluster:
            obj = custom.get_cluster_custom_object(group, version, "clusterratelimitpolicies", policy)
        else:
            obj = custom.get_namespaced_custom_object(group, version, namespace, "ratelimitpolicies", policy)
    except ApiException as exc:
        if exc.status == 404:
            raise ValueError(f"--{'cluster-' if cluster else ''}policy: no {kind}{where} named {policy!r}"
                             "; nothing created") from None
        raise
    items = ((obj or {}).get("spec") or {}).get("tiers") or []
    tiers = [t.get("name") for t in items if isinstance(t, dict)]
    if tier not in tiers:
        raise ValueError(f"--tier: {kind} {policy!r} has no tier {tier!r} "
                         f"(its tiers: {', '.join(map(str, tiers)) or 'none'}); nothing created")


def run(args: argparse.Namespace, api: Any = None) -> int:
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    cluster_policy = getattr(args, "cluster_policy", None)
    ns = args.namespace or (cluster_keys_namespace() if cluster_policy else "default")
    label = CLUSTER_POLICY_LABEL if cluster_policy else POLICY_LABEL
    policy: str = cluster_policy or getattr(args, "policy", None) or ""
    try:
        if args.action == "create":
            key = new_key(args.tier)
            body = secret_manifest(ns, policy, args.tier, key, limit=args.limit,
                                   expires_at=args.expires_at, label=label)
            check_tier(api, policy, args.tier, namespace=ns, cluster=bool(cluster_policy))
            made = api.create_namespaced_secret(ns, body)
            kind = "cluster policy" if cluster_policy else "policy"
            print(f"created secret {ns}/{made.metadata.name} for {kind} {policy}, tier {args.tier}")
            print(f"API key (shown once, store it now): {key}")
        elif args.action == "list":
            # Label selectors cannot OR: without a policy, list both kinds of key Secret.
            selectors = ([f"{label}={policy}"] if policy else [POLICY_LABEL, CLUSTER_POLICY_LABEL])
            found = {s.metadata.name: s for sel in selectors
                     for s in api.list_namespaced_secret(ns, label_selector=sel).items}
            items = [found[n] for n in sorted(found)]
            print(f"{'NAME':40} {'POLICY':28} {'TIER':12} {'STATE':10} EXPIRES")
            for s in items:
                data = s.data or {}
                state = "revoked" if (_unb64(data, "disabled") or "").lower() == "true" else "active"
                labels = s.metadata.labels or {}
                owner = labels.get(POLICY_LABEL) or f"cluster/{labels.get(CLUSTER_POLICY_LABEL, '')}"
                print(f"{s.metadata.name:40} {owner:28} "
                      f"{_unb64(data, 'tier') or '?':12} {state:10} {_unb64(data, 'expiresAt') or '-'}")
        elif args.action == "revoke":
            api.patch_namespaced_secret(args.name, ns, {"data": {"disabled": _b64("true")}})
            print(f"revoked {ns}/{args.name} (the Secret is kept)")
        elif args.action == "rotate":
            old = api.read_namespaced_secret(args.name, ns)
            old_labels = old.metadata.labels or {}
            label = CLUSTER_POLICY_LABEL if CLUSTER_POLICY_LABEL in old_labels else POLICY_LABEL
            policy = old_labels[label]
            tier = _unb64(old.data, "tier") or ""
            key = new_key(tier)
            made = api.create_namespaced_secret(ns, secret_manifest(
                ns, policy, tier, key, limit=_unb64(old.data, "limit"),
                expires_at=_unb64(old.data, "expiresAt"), label=label))
            if args.grace:
                until = dt.datetime.now(dt.UTC) + dt.timedelta(microseconds=parse_duration_us(args.grace))
                patch = {"data": {"expiresAt": _b64(until.strftime("%Y-%m-%dT%H:%M:%SZ"))}}
                note = f"the old key works until {until:%Y-%m-%d %H:%M:%S} UTC"
            else:
                patch = {"data": {"disabled": _b64("true")}}
                note = "the old key is revoked"
            api.patch_namespaced_secret(args.name, ns, patch)
            print(f"created secret {ns}/{made.metadata.name}; {note}")
            print(f"API key (shown once, store it now): {key}")
    except ApiException as exc:
        print(f"error: Kubernetes API: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
