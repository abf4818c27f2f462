"""The analytics API (aiohttp routes under ``/v1``, mounted on the ``sluice analytics`` server
beside ``/metrics`` and ``/healthz``): usage read from the rollups (:mod:`sluice_analytics.
queries`), and one client's buckets read or reset in Redis (:mod:`sluice_core.buckets`).

Every call is authenticated and authorised first (:mod:`sluice_analytics.auth`), then its
parameters checked (:mod:`sluice_analytics.params`); errors are problem+json (RFC 9457) with the
parameter named. A reset is audited: one log line (policy, caller, how many buckets; never the
client's key material) and, in cluster mode, a Kubernetes Event on the policy.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sluice_core import buckets, configstore
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice_analytics import params, queries
from sluice_analytics.auth import Access, Authorizer, Denied, KubernetesAuth, bearer
from sluice_analytics.openapi import document
from sluice_analytics.params import ParamError

log = logging.getLogger("sluice.analytics.api")
PROBLEM = "application/problem+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ApiContext:
    engine: AsyncEngine
    auth: Authorizer
    redis: configstore.Client | None = None


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"type": "about:blank", "title": title, "status": status, "detail": detail,
                              **extra}, status=status, content_type=PROBLEM)


def _query(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.query.items():
        if k in out:
            raise ParamError(k, "given more than once")
        out[k] = v
    return out


async def _authorise(ctx: ApiContext, request: web.Request, access: Access) -> str:
    return await ctx.auth.check(bearer(request.headers.get("Authorization")), access)


def _read_access(flt: queries.Filter) -> Access:
    return Access("get", "usage", flt.namespace, flt.policy)


def routes(ctx: ApiContext) -> list[web.RouteDef]:
    """The API's routes (each wrapped in :func:`_errors`)."""

    async def series(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "client", "endpoint", "start", "end", "step"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, _read_access(flt))
        rng, step = params.step(q, params.time_range(q))
        body = await queries.series(ctx.engine, flt, rng.start, rng.end, step)
        return web.json_response({"start": rng.start, "end": rng.end, "step": step, **body})

    async def top(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "endpoint", "start", "end", "by", "limit"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, _read_access(flt))
        rng, by, limit = params.time_range(q), params.by(q), params.limit(q)
        rows = await queries.top(ctx.engine, flt, rng.start, rng.end, by, limit)
        return web.json_response({"start": rng.start, "end": rng.end, "by": by, "consumers": rows})

    async def endpoints(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "client", "start", "end", "limit"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, _read_access(flt))
        rng, limit = params.time_range(q), params.limit(q, 20)
        rows = await queries.endpoints(ctx.engine, flt, rng.start, rng.end, limit)
        return web.json_response({"start": rng.start, "end": rng.end, "endpoints": rows})

    async def limited(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "minutes", "limit"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, _read_access(flt))
        minutes, limit = params.minutes(q), params.limit(q, 20)
        now = int(time.time())
        since = now - now % 60 - (minutes - 1) * 60
        rows = await queries.limited_now(ctx.engine, flt, since, limit)
        return web.json_response({"since": since, "minutes": minutes, "clients": rows})

    async def client(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "start", "end"))
        who = params.text({"client": request.match_info["client"]}, "client", required=True)
        flt = params.usage_filter(q, client=who)
        await _authorise(ctx, request, _read_access(flt))
        rng = params.time_range(q)
        body = await queries.client_usage(ctx.engine, flt, rng.start, rng.end)
        return web.json_response({"client": who, "start": rng.start, "end": rng.end, **body})

    async def report(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "from", "to"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, _read_access(flt))
        rng = params.days(q)
        rows = await queries.report(ctx.engine, flt, rng.start, rng.end)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(queries.REPORT_COLUMNS)
        for row in rows:
            writer.writerow([time.strftime("%Y-%m-%d", time.gmtime(row[0])), *(_cell(v) for v in row[1:])])
        return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8")

    async def bucket(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "client"))
        namespace = params.text(q, "namespace", required=True)
        assert namespace is not None
        ref = params.policy_filter(q, namespace)
        spec = params.text(q, "client", required=True)
        if ref is None:
            raise ParamError("policy", "required")
        access = Access("update" if request.method == "DELETE" else "get",
                        "buckets" if request.method == "DELETE" else "usage", namespace, ref)
        caller = await _authorise(ctx, request, access)
        assert spec is not None
        try:
            client_id = buckets.client_id(spec)
        except buckets.BucketError as exc:
            raise ParamError("client", str(exc).partition(": ")[2]) from None
        if ctx.redis is None:
            return problem(503, "Service Unavailable", "no Redis to read buckets from")
        pol_ns, _, pol_name = ref.rpartition("/")
        try:
            policy = await buckets.find_policy(ctx.redis, pol_ns, pol_name)
        except buckets.BucketError as exc:
            return problem(404, "Not Found", str(exc))
        if request.method != "DELETE":
            views = await buckets.read(ctx.redis, policy, client_id)
            return web.json_response({"policy": ref, "client": client_id,
                                      "buckets": [v.as_dict() for v in views]})
        deleted = await buckets.reset(ctx.redis, policy, client_id)
        await _audit(ctx, access, caller, deleted)
        return web.json_response({"policy": ref, "client": client_id, "deleted": deleted})

    handlers: list[tuple[str, str, Handler]] = [
        ("GET", "/v1/series", series), ("GET", "/v1/top", top), ("GET", "/v1/endpoints", endpoints),
        ("GET", "/v1/limited", limited), ("GET", "/v1/clients/{client:.+}", client),
        ("GET", "/v1/report.csv", report), ("GET", "/v1/buckets", bucket), ("DELETE", "/v1/buckets", bucket)]
    out = [web.route(m, p, _errors(h)) for m, p, h in handlers]
    spec_body = document()

    async def openapi(_request: web.Request) -> web.StreamResponse:
        return web.json_response(spec_body)

    return [*out, web.get("/openapi.json", openapi)]


def _cell(v: Any) -> Any:
    # A CSV cell opened in a spreadsheet must not run as a formula (client ids come from requests).
    return "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v


async def _audit(ctx: ApiContext, access: Access, caller: str, deleted: int) -> None:
    # The client is named by no more than the policy and a count: its id is a key digest or an
    # address, which the audit trail does not need (the caller knows whom they reset).
    log.info("bucket reset: policy %s by %s (%d buckets deleted)", access.policy, caller, deleted)
    if isinstance(ctx.auth, KubernetesAuth):
        try:
            await ctx.auth.event(access, "BucketReset",
                                 f"{caller} reset a client's buckets ({deleted} deleted) through sluice analytics")
        except Denied as exc:
            log.warning("bucket reset: the Event on %s could not be written: %s", access.policy, exc.detail)


def _errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ParamError as exc:
            return problem(400, "Bad Request", exc.detail, param=exc.param)
        except Denied as exc:
            title = {401: "Unauthorized", 403: "Forbidden"}.get(exc.status, "Service Unavailable")
            resp = problem(exc.status, title, exc.detail)
            if exc.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="sluice-analytics"'
            return resp
        except configstore.ConfigStoreError:
            log.warning("api: Redis failed on %s", request.path, exc_info=True)
            return problem(503, "Service Unavailable", "Redis could not be reached")
        except SQLAlchemyError as exc:
            log.warning("api: the database failed on %s: %s", request.path, type(exc).__name__)
            return problem(503, "Service Unavailable", "the usage database could not be read")

    return wrapped
