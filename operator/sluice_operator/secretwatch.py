"""The key Secrets, listed then watched by the operator itself, the API server filtering them by
label: kopf is not used for them.

Why not kopf (measured, ``python -m bench.operator_scale --keys 10000``): kopf watches every
Secret of the watched namespaces, labelled or not, keeps a per-object memory for each (~0.9 KB)
and, while its indexes fill at start-up, a per-object readiness toggle whose every change wakes
every waiting object's worker: quadratic, so 10,000 key Secrets kept an operator busy for
minutes before its first handler ran. Here a start-up is one paginated list of the labelled
Secrets only, and each later event costs O(1). A page is :data:`PAGE` Secrets: a Secret may be
up to 1 MiB (1.5 MB as JSON), so a page of 500 could be 750 MB in the operator's memory (anyone
who may create Secrets in one served namespace could crash it at every listing); each Secret's
body is dropped as soon as it is read, and one whose data is absurdly large is refused (a key
problem in its policy's status), never held.

An operator restricted to namespaces given by name (``--namespace shop``, no patterns) lists and
watches each one's Secrets (RBAC: a Role per namespace suffices); with patterns, all Secrets of
the cluster carrying the label (RBAC: cluster-wide ``list``/``watch``).

What is kept per Secret is its :class:`~sluice_operator.keysecrets.SecretKey` record (no key,
no data). :attr:`KeySecretWatch.listed` is set once the first listing is complete: a policy's
first judgement of its keys (which revokes what no Secret backs) waits for it. After a watch
gap (410 Gone, a dropped connection) the Secrets are listed again and what changed meanwhile,
deletions included, is reported."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
from sluice_core.grants import MAX_KEY_ID

from sluice_operator.keysecrets import SecretKey, read_secret

log = logging.getLogger("sluice.operator")
PAGE = 50  # Secrets a page: at most ~75 MB of JSON, however large the Secrets
READ_FIELDS = ("key", "tier", "limit", "expiresAt", "disabled")
MAX_FIELD = 4096
"""Base64 characters of one field the operator reads (a generated key is ~60): a larger one is a
key problem, not a key."""
MAX_DATA = 65536
"""Base64 characters of a key Secret's whole data: a larger Secret is a key problem."""
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
WATCH_S = 300  # the API server ends a watch after this; it is renewed from where it ended
RETRY_S = (1.0, 30.0)  # back-off after a failure: first, most
OnChange = Callable[[str, str, SecretKey | None], Awaitable[None]]
"""(scope, key id, its record or None when gone)"""


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


def served(namespace: str, patterns: Iterable[str]) -> bool:
    """kopf's rule for ``--namespace`` patterns: any including one (or none given), no ``!`` one."""
    pats = list(patterns)
    include = [p for p in pats if not p.startswith("!")]
    if include and not any(fnmatch.fnmatchcase(namespace, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(namespace, p[1:]) for p in pats if p.startswith("!"))


def named_namespaces(patterns: Iterable[str]) -> list[str] | None:
    """The namespaces ``--namespace`` names, when every one is a plain name (then each is listed
    and watched on its own); None with any pattern, exclusion, or none (the whole cluster)."""
    pats = list(patterns)
    if not pats or not all(NAMESPACE_NAME.fullmatch(p) for p in pats):
        return None
    return sorted(set(pats))


def oversized(body: Mapping[str, Any]) -> str | None:
    """What makes a key Secret's data absurdly large (a problem), or None."""
    data = body.get("data") or {}
    if not isinstance(data, Mapping):
        return None
    for name in READ_FIELDS:
        value = data.get(name)
        if isinstance(value, str) and len(value) > MAX_FIELD:
            return f"data.{name} is larger than {MAX_FIELD} base64 characters"
    if sum(len(v) for v in data.values() if isinstance(v, str)) > MAX_DATA:
        return f"its data is larger than {MAX_DATA} base64 characters"
    return None


class KeySecretWatch:
    """Secrets with ``label`` (all namespaces, or ``namespace`` only); ``scope_of`` maps a
    Secret's namespace to the scope its key belongs to (None: not served)."""

    def __init__(self, api_client: Callable[[], Any], label: str, scope_of: Callable[[str], str | None],
                 on_change: OnChange, *, namespace: str | None = None) -> None:
        self.api_client = api_client
        self.label = label
        self.scope_of = scope_of
        self.on_change = on_change
        self.namespace = namespace
        self.records: dict[str, dict[str, SecretKey]] = {}  # scope -> key id -> record
        self.listed = asyncio.Event()

    def keys(self, scope: str) -> list[SecretKey]:
        return list(self.records.get(scope, {}).values())

    async def run(self) -> None:
        delay = RETRY_S[0]
        while True:
            try:
                async with self._session() as (session, base, headers):
                    version = await self._list(session, base, headers)
                    delay = RETRY_S[0]
                    while True:
                        version = await self._watch(session, base, headers, version)
            except asyncio.CancelledError:
                raise
            except Gone:
                continue
            except Exception as exc:  # API server away, RBAC, a bug: said, retried
                log.warning("key Secrets (%s): %s; listing again in %.0f s", self.label, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])

    @contextlib.asynccontextmanager
    async def _session(self) -> Any:
        """An HTTP session authenticated as the Kubernetes client ``api_client`` makes is."""
        cfg = self.api_client().configuration
        context: ssl.SSLContext | bool = False
        if cfg.host.startswith("https"):
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if not cfg.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)
        headers = {"Accept": "application/json"}
        # as the client's own auth_settings: refreshed by the in-cluster config's hook
        token = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        path = f"/api/v1/namespaces/{self.namespace}/secrets" if self.namespace else "/api/v1/secrets"
        # read_bufsize: a watch event is one line, and a Secret may be up to 1 MiB
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), read_bufsize=2 ** 21,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                       sock_read=WATCH_S + 30)) as session:
            yield session, cfg.host.rstrip("/") + path, headers

    async def _list(self, session: aiohttp.ClientSession, base: str, headers: Mapping[str, str]) -> str:
        """Every labelled Secret, a page at a time; report what changed since the last listing
        (once :attr:`listed`); return the list's resourceVersion."""
        seen: dict[str, set[str]] = {}
        params: dict[str, Any] = {"labelSelector": self.label, "limit": PAGE}
        while True:
            async with session.get(f"{base}?{urlencode(params)}", headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"listing Secrets: HTTP {r.status}: {(await r.text())[:200]}")
                page = await r.json()
            items = page.pop("items", None) or []
            items.reverse()
            while items:  # each body dropped once read: a page's data never held whole twice
                key = self._put("ADDED", items.pop())
                if key is not None:
                    seen.setdefault(key[0], set()).add(key[1])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        for scope, kept in list(self.records.items()):  # gone while nobody watched
            for key_id in [k for k in kept if k not in seen.get(scope, set())]:
                del kept[key_id]
                if self.listed.is_set():
                    await self.on_change(scope, key_id, None)
        if not self.listed.is_set():
            self.listed.set()
            log.info("key Secrets (%s): %s listed", self.label, sum(len(k) for k in self.records.values()))
        else:
            await self._report_all()
        return str(meta.get("resourceVersion") or "")

    async def _report_all(self) -> None:
        """After a gap, every record is reported again: a change meanwhile costs its write; an
        unchanged Secret costs nothing (its grant is as written)."""
        for scope, kept in list(self.records.items()):
            for key_id, key in list(kept.items()):
                await self.on_change(scope, key_id, key)

    async def _watch(self, session: aiohttp.ClientSession, base: str, headers: Mapping[str, str],
                     version: str) -> str:
        params = {"labelSelector": self.label, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": WATCH_S}
        async with session.get(f"{base}?{urlencode(params)}", headers=headers) as r:
            if r.status == 410:
                raise Gone
            if r.status != 200:
                raise RuntimeError(f"watching Secrets: HTTP {r.status}: {(await r.text())[:200]}")
            async for line in r.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if body.get("code") == 410:
                        raise Gone
                    raise RuntimeError(f"watching Secrets: {body.get('message')}")
                version = str((body.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                key = self._put(str(kind), body)
                if key is not None:
                    scope, key_id = key
                    await self.on_change(scope, key_id, self.records.get(scope, {}).get(key_id))
        return version

    def _put(self, kind: str, body: Mapping[str, Any]) -> tuple[str, str] | None:
        """Keep what the event says of its Secret; (scope, key id), or None if not served. A
        Secret no longer labelled comes as DELETED (the API server filters the watch)."""
        meta = body.get("metadata") or {}
        scope = self.scope_of(str(meta.get("namespace") or ""))
        if scope is None:
            return None
        key = None if kind == "DELETED" else read_secret(body, self.label)
        key_id = f"{meta.get('namespace') or ''}/{meta.get('name') or '?'}"[:MAX_KEY_ID]
        problem = oversized(body) if key is not None else None
        if key is not None and problem is not None:
            key = SecretKey(key.key_id, key.policy, problem=problem)
        kept = self.records.setdefault(scope, {})
        if key is None:
            kept.pop(key_id, None)
        else:
            kept[key_id] = key
        return scope, key_id
