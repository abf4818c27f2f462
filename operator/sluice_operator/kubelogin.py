"""kopf's connection to the API server, with a bounded number of connections.

kopf's own HTTP session has no connection limit: at start-up every object's worker sends its
PATCH at once, so 1,000 fresh policies open about 1,000 TLS connections, each a handshake on
both sides of two shared cores and 128 KiB of asyncio buffers in the operator (most of its
start-up RSS peak), closed again after aiohttp's keep-alive. Here the same credentials go into
a session of at most ``API_CONNECTIONS`` connections: the requests queue for one instead.

Only for a cluster-wide operator: kopf holds one connection per watch stream, and an operator
restricted to namespace patterns watches each resource in each matching namespace (possibly
more streams than any fixed limit, which would then block every request)."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import aiohttp
import kopf

API_CONNECTIONS = 32
"""Connections to the API server; a cluster-wide operator's watch streams take about seven."""


def pooled_session(info: kopf.ConnectionInfo, limit: int = API_CONNECTIONS) -> kopf.AiohttpSession:
    """kopf's session for these credentials (as kopf makes it), with at most ``limit``
    connections."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="kopf")
        auth = info.as_aiohttp_basic_auth()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), auth=auth, proxy=info.proxy_url, trust_env=info.trust_env)
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration, aiohttp_session=session)


_last: list[tuple[asyncio.AbstractEventLoop, kopf.ConnectionInfo, kopf.AiohttpSession]] = []
"""The event loop, credentials of the last login and the session made for them (a session
belongs to its loop: an operator started again in the same process, as the tests do, logs in
anew)."""


async def login_pooled(**kwargs: Any) -> kopf.AiohttpSession | None:
    """The kubernetes client's credentials (in-cluster ServiceAccount, else the kubeconfig), as
    ``kopf.login_via_client`` reads them, in a bounded session.

    Equal credentials get the same session: kopf keeps credentials that an API call rejected
    (401) out of its vault by comparing them with the rejected ones, and a new session object
    would make the same token look new. A token that stays invalid (the ServiceAccount deleted:
    `helm uninstall` removes it while the replicas stop) was re-logged-in and retried in a loop
    of ~40 logins a second until the SIGKILL; now kopf gives up on it (LoginError), as with
    ``kopf.login_via_client``, and a rotated token (the kubelet rewrites the file) is new."""
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    loop = asyncio.get_running_loop()
    if _last and _last[0][0] is loop and _last[0][1] == info:
        return _last[0][2]
    session = pooled_session(info)
    _last[:] = [(loop, info, session)]
    return session
