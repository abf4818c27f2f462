"""``sluice usage top|series|report|limited`` (a client of the analytics API, standard library
HTTP only) and ``sluice bucket get|reset`` (straight to Redis through :mod:`sluice_core.buckets`,
like ``sluice apply``). Registered by :mod:`sluice_core.cli`.

A table for people by default, ``--json`` (the API's answer as it is) for scripts. The token is
read from ``--token-file`` (or ``--token``, or ``SLUICE_ANALYTICS_TOKEN``) and sent only as a
bearer header; it is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from sluice_core import buckets, configstore

DEFAULT_URL = "http://127.0.0.1:9092"
TIMEOUT_S = 30.0


def add_parsers(sub: Any) -> None:
    usage = sub.add_parser("usage", help="usage per client, endpoint and time from `sluice analytics` (its API)")
    actions = usage.add_subparsers(dest="action", metavar="ACTION", required=True)
    top = _api_parser(actions, "top", "top consumers in a range")
    top.add_argument("--by", choices=("requests", "limited", "tokens"), default="requests")
    top.add_argument("--limit", type=int, default=10)
    _range(top)
    series = _api_parser(actions, "series", "a time series (outcomes per point)")
    series.add_argument("--client")
    series.add_argument("--endpoint")
    series.add_argument("--step", help="60, 5m, 1h, 1d (default: about 60 points)")
    _range(series)
    report = _api_parser(actions, "report", "CSV usage per client per day (billing)")
    report.add_argument("--from", dest="from_", required=True, metavar="YYYY-MM-DD")
    report.add_argument("--to", required=True, metavar="YYYY-MM-DD", help="last day, included")
    limited = _api_parser(actions, "limited", "who is limited now (last minutes)")
    limited.add_argument("--minutes", type=int, default=5)
    limited.add_argument("--limit", type=int, default=20)
    usage.set_defaults(func=run_usage)

    bucket = sub.add_parser("bucket", help="a client's buckets under a policy, read or reset in Redis")
    baction = bucket.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("get", "tokens left, capacity, time to full"),
                       ("reset", "delete the client's buckets of the policy (full again)")):
        b = baction.add_parser(name, help=text)
        b.add_argument("--redis", required=True, help="Redis URL (as for sluice apply)")
        b.add_argument("--namespace", default="default", help="the policy's namespace (_cluster: a ClusterRateLimitPolicy)")
        b.add_argument("--policy", required=True, help="the policy's name")
        b.add_argument("--client", required=True,
                       help="ip:ADDRESS, header:VALUE, api-key-sha256:HEX (never the key itself) or id:CLIENT_ID")
        b.add_argument("--json", action="store_true", help="print JSON")
    bucket.set_defaults(func=run_bucket)


def _api_parser(actions: Any, name: str, text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = actions.add_parser(name, help=text)
    p.add_argument("--url", default=os.environ.get("SLUICE_ANALYTICS_URL", DEFAULT_URL),
                   help=f"the analytics API (default {DEFAULT_URL}, or SLUICE_ANALYTICS_URL)")
    p.add_argument("--token-file", help="file with the bearer token (a Kubernetes token in a cluster)")
    p.add_argument("--token", help="the bearer token (visible to other local users: prefer --token-file)")
    p.add_argument("--namespace", required=True)
    p.add_argument("--policy", help="NAME, NAMESPACE/NAME or _cluster/NAME")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    return p


def _range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default="1h", help="start this long ago (30m, 6h, 7d; default 1h)")
    p.add_argument("--start", help="unix seconds or RFC 3339 (instead of --since)")
    p.add_argument("--end", help="unix seconds or RFC 3339 (default: now)")


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isascii() and text[:-1].isdigit():
        return int(text[:-1]) * units[text[-1]]
    if text.isascii() and text.isdigit():
        return int(text)
    raise SystemExit(f"sluice usage: --since: expected 30m, 6h, 7d, not {text!r}")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip()
    return args.token or os.environ.get("SLUICE_ANALYTICS_TOKEN")


class ApiFailed(RuntimeError):
    pass


def call(url: str, path: str, query: dict[str, Any], token: str | None) -> tuple[str, bytes]:
    """GET ``path``; (content type, body). A problem answer becomes :class:`ApiFailed` with its
    detail (and the parameter it names)."""
    q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    req = urllib.request.Request(f"{url.rstrip('/')}{path}?{q}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as exc:
        try:
            p = json.loads(exc.read())
            msg = f"{exc.code} {p.get('title', '')}: " + (f"{p['param']}: " if p.get("param") else "") + str(p.get("detail"))
        except ValueError:
            msg = f"{exc.code} {exc.reason}"
        raise ApiFailed(msg) from None
    except urllib.error.URLError as exc:
        raise ApiFailed(f"cannot reach {url}: {exc.reason}") from None


def _query(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    q: dict[str, Any] = {"namespace": args.namespace, "policy": args.policy}
    if args.action in ("top", "series"):
        end = args.end or str(int(time.time()))
        start = args.start or (str(int(end) - _seconds(args.since)) if end.isascii() and end.isdigit() else None)
        q.update(start=start, end=end)
    if args.action == "top":
        return "/v1/top", q | {"by": args.by, "limit": args.limit}
    if args.action == "series":
        return "/v1/series", q | {"client": args.client, "endpoint": args.endpoint, "step": args.step}
    if args.action == "report":
        return "/v1/report.csv", q | {"from": args.from_, "to": args.to}
    return "/v1/limited", q | {"minutes": args.minutes, "limit": args.limit}


def run_usage(args: argparse.Namespace) -> int:
    path, query = _query(args)
    try:
        kind, body = call(args.url, path, query, _token(args))
    except ApiFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if kind == "text/csv" or args.json:
        sys.stdout.write(body.decode())
        if args.json:
            sys.stdout.write("\n")
        return 0
    data = json.loads(body)
    if args.action == "top":
        _table(["CLIENT", "REQUESTS", "LIMITED", "TOKENS"],
               [[c["client"], c["requests"], c["limited"], c["tokens"]] for c in data["consumers"]])
    elif args.action == "limited":
        _table(["CLIENT", "POLICY", "TIER", "ENDPOINT", "LIMITED", "LAST MINUTE"],
               [[c["client"], c["policy"], c["tier"], c["endpoint"], c["limited"], _utc(c["last_minute"])]
                for c in data["clients"]])
    else:
        outcomes = sorted({o for p in data["points"] for o in p["outcomes"]})
        _table(["TIME", "REQUESTS", *(o.upper() for o in outcomes)],
               [[_utc(p["t"]), p["requests"], *(p["outcomes"].get(o, 0) for o in outcomes)]
                for p in data["points"]])
    return 0


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header), *([str(v) for v in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def run_bucket(args: argparse.Namespace) -> int:
    async def go() -> dict[str, Any]:
        client_id = buckets.client_id(args.client)
        async with configstore.connect(args.redis) as client:
            policy = await buckets.find_policy(client, args.namespace, args.policy)
            if args.action == "reset":
                return {"policy": policy.ref, "client": client_id,
                        "deleted": await buckets.reset(client, policy, client_id)}
            views = await buckets.read(client, policy, client_id)
            return {"policy": policy.ref, "client": client_id, "buckets": [v.as_dict() for v in views]}

    try:
        out = asyncio.run(go())
    except (buckets.BucketError, configstore.ConfigStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    elif "deleted" in out:
        print(f"reset: policy {out['policy']}, client {out['client']}: {out['deleted']} buckets deleted")
    else:
        _table(["KIND", "NAME", "REMAINING", "CAPACITY", "FULL IN", "NEXT TOKEN IN"],
               [[b["kind"], b["name"], b["remaining"], b["capacity"], f"{b['full_in_ms'] / 1000:g}s",
                 f"{b['next_token_in_ms'] / 1000:g}s"] for b in out["buckets"]])
    return 0
