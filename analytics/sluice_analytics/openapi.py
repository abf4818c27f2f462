"""The analytics API's OpenAPI 3 document, served at ``/openapi.json`` (and what the fuzz test
generates requests from). Written as data next to the routes it describes
(:mod:`sluice_analytics.api`); the parameters' rules are :mod:`sluice_analytics.params`'."""

from __future__ import annotations

from typing import Any

from sluice_core.usage import OUTCOMES

from sluice_analytics.queries import BY, MAX_LIMIT, MAX_LIMITED_MINUTES

TEXT = {"type": "string", "maxLength": 256, "pattern": "^[^\\x00-\\x1f]*$"}
"""A name as stored: at most 256 characters, no control characters."""


def _p(name: str, description: str, *, required: bool = False, where: str = "query",
       schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": schema or TEXT}


NS = _p("namespace", "the namespace whose usage is asked (reads are authorised on it, or on the policy)",
        required=True, schema={**TEXT, "minLength": 1})
POLICY = _p("policy", "a policy: NAME, NAMESPACE/NAME or _cluster/NAME")
START = _p("start", "unix seconds or RFC 3339 with a zone; default: end - 1 h (moved down to a whole minute)")
END = _p("end", "unix seconds or RFC 3339 with a zone; default: now (moved up to a whole minute)")
LIMIT = _p("limit", f"rows, 1 to {MAX_LIMIT}", schema={"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})
CLIENT_Q = _p("client", "a client as counted: key:<key id>, header:<digest>, ip:<address>, anonymous")
ENDPOINT = _p("endpoint", "a rule's name or a normalised path")

PROBLEM = {"description": "a problem (RFC 9457): 400 names the parameter in `param`",
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
ERRORS = {"400": PROBLEM, "401": PROBLEM, "403": PROBLEM, "503": PROBLEM}


def _get(summary: str, parameters: list[dict[str, Any]], schema: dict[str, Any],
         media: str = "application/json") -> dict[str, Any]:
    return {"summary": summary, "parameters": parameters,
            "responses": {"200": {"description": "OK", "content": {media: {"schema": schema}}}, **ERRORS}}


def _with_404(op: dict[str, Any]) -> dict[str, Any]:
    """An operation that names a policy: 404 when no config in Redis holds it."""
    return {**op, "responses": {**op["responses"], "404": PROBLEM}}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props)}


INT = {"type": "integer"}
STR = {"type": "string"}
NINT = {"type": ["integer", "null"]}
OUTCOME_MAP = {"type": "object", "additionalProperties": INT,
               "description": "requests per outcome: " + ", ".join(OUTCOMES)}


def document() -> dict[str, Any]:
    bucket_params = [NS, {**POLICY, "required": True},
                     _p("client", "ip:ADDRESS, header:VALUE, api-key-sha256:HEX or id:CLIENT_ID", required=True)]
    bucket = _obj(kind=STR, name=STR, capacity=INT, remaining=INT, full_in_ms=INT, next_token_in_ms=INT)
    return {
        "openapi": "3.0.3",
        "info": {"title": "Sluice usage analytics", "version": "1",
                 "description": "Usage per namespace, policy, client and endpoint from the rollups of "
                                "`sluice analytics`, and bucket inspection and reset. Bearer token: a "
                                "Kubernetes token (cluster mode) or the standalone API token."},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "required": ["title", "status", "detail"], "properties": {
                "type": STR, "title": STR, "status": INT, "detail": STR, "param": STR}}}},
        "paths": {
            "/v1/series": {"get": _get(
                "a time series with an outcome breakdown per point",
                [NS, POLICY, CLIENT_Q, ENDPOINT, START, END,
                 _p("step", "seconds or 5m / 1h / 1d, a whole number of minutes; at most 1000 points")],
                _obj(start=INT, end=INT, step=INT, table=STR, points={"type": "array", "items": _obj(
                    t=INT, requests=INT, tokens=INT, outcomes=OUTCOME_MAP)}))},
            "/v1/top": {"get": _get(
                "top consumers in a range",
                [NS, POLICY, ENDPOINT, START, END, _p("by", "order", schema={"type": "string", "enum": list(BY)}), LIMIT],
                _obj(start=INT, end=INT, by=STR, consumers={"type": "array", "items": _obj(
                    client=STR, requests=INT, limited=INT, tokens=INT)}))},
            "/v1/endpoints": {"get": _get(
                "requests per endpoint (rule), with latency from the histogram",
                [NS, POLICY, CLIENT_Q, START, END, LIMIT],
                _obj(start=INT, end=INT, endpoints={"type": "array", "items": _obj(
                    endpoint=STR, requests=INT, limited=INT, tokens=INT, latency_avg_us=NINT,
                    latency_p50_us=NINT, latency_p95_us=NINT, latency_p99_us=NINT)}))},
            "/v1/limited": {"get": _get(
                "who is limited now: refused clients in the last minutes, with the policy, tier and endpoint",
                [NS, POLICY, _p("minutes", f"1 to {MAX_LIMITED_MINUTES}, default 5",
                                schema={"type": "integer", "minimum": 1, "maximum": MAX_LIMITED_MINUTES}), LIMIT],
                _obj(since=INT, minutes=INT, clients={"type": "array", "items": _obj(
                    client=STR, policy=STR, tier=STR, endpoint=STR, limited=INT, last_minute=INT)}))},
            "/v1/clients/{client}": {"get": _get(
                "one client's usage in a range",
                [_p("client", "the client as counted", required=True, where="path"), NS, POLICY, START, END],
                _obj(client=STR, start=INT, end=INT, requests=INT, tokens=INT, bytes_in=INT, bytes_out=INT,
                     outcomes=OUTCOME_MAP, breakdown={"type": "array", "items": _obj(
                         policy=STR, tier=STR, outcome=STR, requests=INT, tokens=INT)}))},
            "/v1/report.csv": {"get": _get(
                "usage per client per UTC day (billing), CSV",
                [NS, POLICY, _p("from", "first day, YYYY-MM-DD", required=True, schema={"type": "string", "format": "date"}),
                 _p("to", "last day (included), YYYY-MM-DD; at most 400 days", required=True,
                    schema={"type": "string", "format": "date"})],
                STR, media="text/csv")},
            "/v1/overview": {"get": _get(
                "the dashboard's cards: totals of a range and the top consumers with their tiers",
                [NS, POLICY, ENDPOINT, START, END, LIMIT],
                _obj(start=INT, end=INT, requests=INT, tokens=INT, outcomes=OUTCOME_MAP,
                     statuses={"type": "object", "additionalProperties": INT}, success=INT, clients=INT,
                     latency_avg_us=NINT, latency_p95_us=NINT, consumers={"type": "array", "items": _obj(
                         client=STR, requests=INT, limited=INT, tokens=INT,
                         tiers={"type": "array", "items": STR})}))},
            "/v1/policies": {"get": _get(
                "the dashboard's policy cards: mode, tiers, Accepted / Programmed / Enforced, sidecars",
                [NS], _obj(namespace=STR, source=STR, sidecars=NINT, truncated={"type": "boolean"},
                           policies={"type": "array", "items": {"type": "object", "required": [
                               "ref", "mode", "accepted", "programmed", "enforced", "may_reset"]}}))},
            "/v1/buckets": {
                "get": _with_404(_get("a client's buckets under a policy, live from Redis", bucket_params,
                                      _obj(policy=STR, client=STR, buckets={"type": "array", "items": bucket}))),
                "delete": {**_with_404(_get("reset a client's buckets under a policy (audited)", bucket_params,
                                            _obj(policy=STR, client=STR, deleted=INT))),
                           "description": "needs update on ratelimitpolicies/buckets"}},
        },
    }
