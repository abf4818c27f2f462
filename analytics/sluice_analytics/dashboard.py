"""The web dashboard of ``sluice analytics``: the page at ``/`` and its three static files
(built from ``analytics/web`` into ``sluice_analytics/static``, committed, no CDN), and the two
reads only the dashboard needs beside the ``/v1`` API: ``/v1/overview`` (the cards and the
consumer table, :mod:`sluice_analytics.overview`) and ``/v1/policies`` (the policy cards,
:mod:`sluice_analytics.policycards`). Both are authorised like every ``/v1`` read.

The page is public (it holds no data; the token is asked for in it and sent by its script as a
bearer header), and served with a strict Content-Security-Policy: scripts, styles and requests
from its own origin only, no inline code, not framable.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

from sluice_analytics import overview, params, policycards, queries
from sluice_analytics.api import ApiContext, Handler, _authorise, _errors, _query
from sluice_analytics.auth import Access, Denied, KubernetesAuth

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files("sluice_analytics").joinpath("static", name).read_bytes()


def routes(ctx: ApiContext) -> list[web.RouteDef]:
    page = _asset("index.html")
    files = {name: (_asset(name), ctype) for name, ctype in STATIC.items()}
    etags = {name: '"' + hashlib.sha256(body).hexdigest()[:20] + '"' for name, (body, _) in files.items()}

    async def index(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        if request.headers.get("If-None-Match") == etags[name]:
            return web.Response(status=304, headers={"ETag": etags[name]})
        body, ctype = files[name]
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers={**HEADERS, "ETag": etags[name]})

    async def summary(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace", "policy", "endpoint", "start", "end", "limit"))
        flt = params.usage_filter(q)
        await _authorise(ctx, request, Access("get", "usage", flt.namespace, flt.policy))
        rng, limit = params.time_range(q), params.limit(q)
        body = await overview.totals(ctx.engine, flt, rng.start, rng.end)
        top = await queries.top(ctx.engine, flt, rng.start, rng.end, "requests", limit)
        tiers = await overview.tiers(ctx.engine, flt, rng.start, rng.end, [c["client"] for c in top])
        consumers = [{**c, "tiers": tiers.get(c["client"], [])} for c in top]
        return web.json_response({"start": rng.start, "end": rng.end, **body, "consumers": consumers})

    async def policies(request: web.Request) -> web.StreamResponse:
        q = _query(request)
        params.only(q, ("namespace",))
        namespace = params.text(q, "namespace", required=True)
        assert namespace is not None
        await _authorise(ctx, request, Access("get", "usage", namespace))
        if isinstance(ctx.auth, KubernetesAuth):
            body = await policycards.from_cluster(ctx.auth, ctx.redis, namespace)
        elif ctx.redis is not None:
            body = await policycards.from_redis(ctx.redis, namespace)
        else:
            body = {"source": "none", "sidecars": None, "policies": [], "truncated": False}
        for card in body["policies"]:
            card["may_reset"] = await _may(ctx, request, Access("update", "buckets", namespace, card["ref"]))
        return web.json_response({"namespace": namespace, **body})

    handlers: list[tuple[str, Handler]] = [("/v1/overview", summary), ("/v1/policies", policies)]
    return [web.get("/", index), web.get("/static/{name}", static),
            *(web.get(p, _errors(h)) for p, h in handlers)]


async def _may(ctx: ApiContext, request: web.Request, access: Access) -> bool:
    """May the caller do ``access``? (Only a 403 is a no: a review that failed is an error.)"""
    try:
        await _authorise(ctx, request, access)
    except Denied as exc:
        if exc.status == 403:
            return False
        raise
    return True
