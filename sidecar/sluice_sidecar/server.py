"""The sidecar process: data port (limit, then proxy) and admin port, started and drained."""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sluice_core.redisurl import parse_redis_url

from sluice_sidecar.breaker import CircuitBreaker, State
from sluice_sidecar.configsource import FileSource, RedisSource
from sluice_sidecar.connections import OVERLOADED, DataServer
from sluice_sidecar.limiter import Enforcement, Limiter, Outcome
from sluice_sidecar.metrics import BatchCollector, Metrics
from sluice_sidecar.problem import problem
from sluice_sidecar.proxy import Proxy, origin_form
from sluice_sidecar.settings import SidecarSettings, split_hostport
from sluice_sidecar.stores.base import DecisionStore
from sluice_sidecar.stores.memory import MemoryStore
from sluice_sidecar.stores.redis import RedisStore

log = logging.getLogger("sluice.sidecar")
PROBLEM_BASE = "https://sluice.dev/problems/"


def match_path(path: str) -> str:
    """The path rules are matched against: ``//a/./b/../c`` -> ``/a/c``, so spelling a path
    differently cannot slip past a rule. The request itself is forwarded unchanged."""
    if "//" not in path and "/." not in path:
        return path
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm + "/" if path.endswith("/") and norm != "/" else norm


class Sidecar:
    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.draining = False
        self.store: DecisionStore
        if settings.redis:
            self.store = RedisStore(parse_redis_url(settings.redis),
                                    timeout=settings.redis_timeout_ms / 1000,
                                    connect_timeout=settings.redis_connect_timeout_ms / 1000)
        else:
            self.store = MemoryStore(max_buckets=settings.memory_max_buckets)
        if isinstance(self.store, RedisStore):
            store = self.store
            self.metrics.registry.register(BatchCollector(lambda: (store.decisions, store.batches)))
        self.breaker = CircuitBreaker(threshold=settings.breaker_threshold,
                                      cooldown=settings.breaker_cooldown_s,
                                      on_change=self._breaker_changed)
        self.limiter = Limiter(self.store, self.metrics, self.breaker)
        self.proxy = Proxy(settings.upstream, self.metrics,
                           connect_timeout=settings.upstream_connect_timeout_s,
                           read_timeout=settings.upstream_timeout_s,
                           max_connections=settings.upstream_max_connections)
        self.source: FileSource | RedisSource
        if settings.policy_file:
            self.source = FileSource(settings.policy_file, settings.api_keys_file, self.metrics,
                                     self._apply, labels_path=settings.pod_labels)
        else:
            assert isinstance(self.store, RedisStore) and settings.namespace
            self.source = RedisSource(self.store.nodes, settings.namespace, self.metrics, self._apply,
                                      labels_path=settings.pod_labels, pod_name=settings.pod_name,
                                      poll_interval=settings.poll_interval_s)
        self.loaded = False
        self._inflight = 0
        self._max_inflight = settings.max_inflight_requests
        self._runners: list[web.BaseRunner] = []
        self.data_port = 0
        self.admin_port = 0

    def _apply(self, enforcement: Enforcement | None, shared: Enforcement | None) -> None:
        self.limiter.active = enforcement
        self.limiter.shared = shared
        self.loaded = True
        self.metrics.config_loaded.set(1)

    def _breaker_changed(self, state: State) -> None:
        self.metrics.circuit_state.set(int(state))
        log.warning("decision store circuit %s", state.name.lower().replace("_", "-"))

    # Data path ----------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = peername[0] if peername else "0.0.0.0"
        if not origin_form(request):  # checked first: a refused target takes no token
            return problem(400, "Bad Request", "the request target must be a path (origin-form)")
        if self._inflight >= self._max_inflight:  # before deciding: no token is taken
            self.metrics.overload_refusals.labels("inflight").inc()
            return problem(503, "Service Unavailable", "too many requests in progress; retry shortly",
                           type_=OVERLOADED, headers=[("Retry-After", "1")])
        self._inflight += 1
        try:
            outcome = await self.limiter.decide(request.method, match_path(request.path), request.headers, peer)
            if outcome.status == 0:
                trusted = "X-Forwarded-Proto" in request.headers and self.limiter.trusts(peer)
                return await self.proxy.forward(request, peer, outcome.headers, trusted_peer=trusted)
            return refusal(outcome)
        finally:
            self._inflight -= 1

    # Admin ------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def components(self) -> dict[str, Any]:
        act, shared = self.limiter.active, self.limiter.shared
        return {
            "config": {"loaded": self.loaded, "version": act.version if act else 0,
                       "policy": act.policy.ref if act else None,
                       "clusterVersion": shared.version if shared else 0,
                       "clusterPolicy": shared.policy.name if shared else None},
            "store": {"kind": self.store.name, "circuit": self.breaker.state.name.lower()},
            "draining": self.draining,
        }

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.loaded and not self.draining
        return web.json_response({"ready": ready, **self.components()}, status=200 if ready else 503)

    async def _config(self, request: web.Request) -> web.Response:
        act, shared = self.limiter.active, self.limiter.shared
        body: dict[str, Any] = self.components()
        from sluice_core.manifest import to_manifest

        if act is not None:
            body["policy"] = to_manifest(act.policy)
            body["apiKeys"] = len(act.grants)  # how many, never which
        if shared is not None:
            body["clusterPolicy"] = to_manifest(shared.policy)
            body["clusterApiKeys"] = len(shared.grants)
        return web.json_response(body, dumps=lambda o: json.dumps(o, indent=2))

    # Lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        await self.proxy.start()
        await self.source.start()
        data = DataServer(self.handle, self.metrics, max_connections=s.max_connections,
                          max_head_bytes=s.max_request_header_bytes, header_timeout=s.header_timeout_s,
                          max_line_size=s.max_header_bytes, max_field_size=s.max_header_bytes,
                          max_headers=s.max_headers, keepalive_timeout=s.keepalive_timeout_s,
                          handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(data, shutdown_timeout=s.shutdown_timeout_s, access_log=None)
        await runner.setup()
        host, port = split_hostport(s.listen, "listen")
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self.data_port = _bound_port(runner)
        admin = web.Application()
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/readyz", self._readyz)
        admin.router.add_get("/admin/config", self._config)
        admin_runner = web.AppRunner(admin, access_log=None)
        await admin_runner.setup()
        ahost, aport = split_hostport(s.admin_listen, "admin-listen")
        await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
        self.admin_port = _bound_port(admin_runner)
        self._runners = [runner, admin_runner]
        log.info("sluice sidecar on %s:%s -> %s (admin %s:%s, store %s)", host, self.data_port,
                 s.upstream, ahost, self.admin_port, self.store.name)

    async def drain(self) -> None:
        """SIGTERM: report not ready so the endpoint is removed, keep serving for ``drain_s``,
        then stop accepting and let in-flight requests finish."""
        self.draining = True
        log.info("draining: not ready, serving for %.1f s more", self.settings.drain_s)
        await asyncio.sleep(self.settings.drain_s)
        await self.stop()

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        await self.source.close()
        await self.proxy.close()
        await self.store.close()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def refusal(outcome: Outcome) -> web.Response:
    if outcome.status == 429:
        return problem(429, "Too Many Requests", outcome.detail, type_=PROBLEM_BASE + "rate-limited",
                       headers=outcome.headers, policy=outcome.policy, tier=outcome.tier,
                       rule=outcome.rule or None)
    if outcome.status == 401:
        return problem(401, "Unauthorized", outcome.detail, type_=PROBLEM_BASE + "api-key-required",
                       headers=outcome.headers, policy=outcome.policy)
    return problem(outcome.status, "Service Unavailable", outcome.detail,
                   type_=PROBLEM_BASE + "limiter-unavailable", headers=outcome.headers,
                   policy=outcome.policy)
