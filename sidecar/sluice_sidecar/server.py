"""The sidecar process: data port (limit, then proxy) and admin port, started and drained."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sluice_core.redisurl import parse_redis_url, with_ca
from sluice_core.sidecar_settings import SidecarSettings

from sluice_sidecar.breaker import CircuitBreaker, State
from sluice_sidecar.configsource import FileSource, NoConfig, RedisSource, one_line
from sluice_sidecar.connections import DataServer
from sluice_sidecar.enforcement import Enforcement, Outcome
from sluice_sidecar.labels import read_labels
from sluice_sidecar.limiter import Limiter
from sluice_sidecar.metrics import BatchCollector, Metrics
from sluice_sidecar.problem import (
    API_KEY_REQUIRED,
    LIMITER_UNAVAILABLE,
    OVERLOADED,
    RATE_LIMITED,
    problem,
)
from sluice_sidecar.proxy import Proxy, origin_form, proxy_headers_in
from sluice_sidecar.settings import split_hostport
from sluice_sidecar.stores.base import DecisionStore
from sluice_sidecar.stores.memory import MemoryStore
from sluice_sidecar.stores.redis import RedisStore
from sluice_sidecar.transport.topology import RedisNodes
from sluice_sidecar.usage_aggregate import UsageAggregator, window_json
from sluice_sidecar.usage_flush import SEND_TIMEOUT_S, UsageFlusher, new_source
from sluice_sidecar.usage_note import UsageNote

log = logging.getLogger("sluice.sidecar")


class StartupError(Exception):
    """The sidecar cannot start: ``sluice sidecar: <what>: <reason>``, one line, no traceback."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")


class Sidecar:
    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.draining = False
        self.store: DecisionStore
        if settings.redis:
            try:
                target = with_ca(parse_redis_url(settings.redis), settings.redis_ca_file)
            except ValueError as exc:  # the message never echoes any part of the URL
                raise StartupError("--redis", str(exc)) from None
            self.store = RedisStore(target, timeout=settings.redis_timeout_ms / 1000,
                                    connect_timeout=settings.redis_connect_timeout_ms / 1000)
        else:
            self.store = MemoryStore(max_buckets=settings.memory_max_buckets)
        if isinstance(self.store, RedisStore):
            store = self.store
            self.metrics.registry.register(BatchCollector(lambda: (store.decisions, store.batches)))
        self.breaker = CircuitBreaker(probe=self.store.probe, threshold=settings.breaker_threshold,
                                      cooldown=settings.breaker_cooldown_s,
                                      on_change=self._breaker_changed,
                                      on_probe=lambda ok: self.metrics.store_probes.labels(
                                          "ok" if ok else "failed").inc())
        self.limiter = Limiter(self.store, self.metrics, self.breaker)
        self.limiter.max_resolves = settings.max_key_resolves
        self.proxy = Proxy(settings.upstream, self.metrics,
                           connect_timeout=settings.upstream_connect_timeout_s,
                           read_timeout=settings.upstream_timeout_s,
                           max_connections=settings.upstream_max_connections,
                           client_timeout=settings.client_timeout_s)
        self.source: FileSource | RedisSource
        if settings.policy_file:
            self.source = FileSource(settings.policy_file, settings.api_keys_file, self.metrics,
                                     self._apply, labels_path=settings.pod_labels)
        else:
            assert isinstance(self.store, RedisStore) and settings.namespace
            self.source = RedisSource(self.store.nodes, settings.namespace, self.metrics, self._apply,
                                      labels_path=settings.pod_labels, pod_name=settings.pod_name,
                                      poll_interval=settings.poll_interval_s,
                                      keys_changed=self.limiter.forget_grants,
                                      grant_cache_size=settings.grant_cache_size,
                                      grant_cache_max_age_s=settings.grant_cache_max_age_s,
                                      notices_up=self.limiter.notices_up)
            self.limiter.notices = False  # until the change-notice subscription is up
        self.loaded = False
        # Requests being decided or proxied: what --max-inflight-requests caps, and what
        # sluice_inflight_requests shows (one counter, read at scrape time).
        self._inflight = 0
        self._max_inflight = settings.max_inflight_requests
        self.metrics.inflight.set_function(lambda: self._inflight)
        self._runners: list[web.BaseRunner] = []
        self._data_runner: web.BaseRunner | None = None
        self._drained: asyncio.Task[None] | None = None  # the drain, once begun (SIGTERM or /drain)
        self.usage: UsageAggregator | None = None
        self.usage_flusher: UsageFlusher | None = None
        if settings.usage == "on":
            self._usage_setup(settings)
        self.data_port = 0
        self.admin_port = 0

    def _usage_setup(self, s: SidecarSettings) -> None:
        """Usage analytics: the aggregator, and the window writer with its own connection to the
        decision store's Redis, else to ``--usage-redis``, else to nowhere (``/usage`` only)."""
        url = s.usage_redis or s.redis
        nodes = None
        if url:
            try:
                target = with_ca(parse_redis_url(url), s.redis_ca_file)
            except ValueError as exc:  # never echoes the URL
                raise StartupError("--usage-redis" if s.usage_redis else "--redis", str(exc)) from None
            nodes = RedisNodes(target, timeout=SEND_TIMEOUT_S, connect_timeout=s.redis_connect_timeout_ms / 1000)
        self.usage = UsageAggregator(max_clients=s.usage_max_clients, max_endpoints=s.usage_max_endpoints)
        self.usage_flusher = UsageFlusher(self.usage, nodes, self.metrics, namespace=s.namespace or "",
                                          source=new_source(s.pod_name), window_s=s.usage_window_s,
                                          maxlen=s.usage_stream_maxlen, retries=s.usage_retries)

    def _apply(self, policy: Enforcement | None, cluster_policy: Enforcement | None) -> None:
        self.limiter.policy = policy
        self.limiter.cluster_policy = cluster_policy
        self.loaded = True
        self.metrics.config_loaded.set(1)
        if self.usage_flusher is not None and not self.settings.namespace and policy is not None:
            self.usage_flusher.namespace = policy.policy.namespace  # standalone: the policy's

    def _breaker_changed(self, state: State) -> None:
        # The gauge only: the breaker logs each change itself (rate-limited, with the reason).
        self.metrics.circuit_state.set(int(state))

    # Data path ----------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._handle(request)
        if self.draining and not response.prepared:
            # `Connection: close`: a keep-alive client reconnects, through the Service, to a
            # pod that is not going away (this one stops accepting after --drain-s).
            response.force_close()
        return response

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = peername[0] if peername else "0.0.0.0"
        if not origin_form(request):  # checked first: a refused target takes no token
            # and closes the connection: what follows it (tunnel bytes after a CONNECT) cannot
            # be trusted to be a request.
            refused = problem(400, "Bad Request", "the request target must be a path without a fragment (origin-form)")
            refused.force_close()
            return refused
        if not self.loaded and self.settings.without_config == "refuse":
            # Cluster mode before its first config (standalone mode does not start without one):
            # fail safe, as the limits this pod must enforce are not known yet.
            self.metrics.decision("", "", "", "no_config")
            return problem(503, "Service Unavailable", "no rate-limit policy is loaded yet",
                           type_=LIMITER_UNAVAILABLE, headers=[("Retry-After", "1")])
        if self._inflight >= self._max_inflight:  # before deciding: no token is taken
            self.metrics.overload_refusals.labels("inflight").inc()
            return problem(503, "Service Unavailable", "too many requests in progress; retry shortly",
                           type_=OVERLOADED, headers=[("Retry-After", "1")])
        self._inflight += 1
        # Usage on: the limiter appends its decisions to the request's note, the proxy the
        # upstream's part, and the aggregator counts it once the request is done.
        note = UsageNote() if self.usage is not None else None
        path = request.rel_url.raw_path
        try:
            # Rules see the path as sent and normalise it themselves (sluice_core.paths); the
            # request is forwarded unchanged.
            outcome = await self.limiter.decide(request.method, path, request.headers, peer, note)
            if outcome.forward:
                # The verdict is looked up only when a header it governs is present (rare).
                trusted = proxy_headers_in(request.headers) and self.limiter.trusts(peer)
                # close: a streamed answer's head is written in there
                return await self.proxy.forward(request, peer, outcome.headers, trusted_peer=trusted,
                                                note=note, close=self.draining)
            return refusal(outcome)
        finally:
            self._inflight -= 1
            if note is not None and self.usage is not None:
                self.usage.record(note, path)

    # Admin ------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _usage(self, request: web.Request) -> web.Response:
        """Usage analytics of this process: the window being counted and the last one taken, as
        the stream entry's JSON (clients by key id, header digest or address: no key material)."""
        f = self.usage_flusher
        if f is None:
            return web.json_response({"usage": "off"}, status=404)
        body = {"source": f.source, "windowSeconds": f.window_s, "stream": f.nodes is not None,
                "pending": len(f.pending), "current": window_json(f.current()), "last": window_json(f.last)}
        return web.json_response(body, dumps=lambda o: json.dumps(o, indent=2))

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def components(self) -> dict[str, Any]:
        policy, cluster_policy = self.limiter.policy, self.limiter.cluster_policy
        return {
            # Names only (*Ref); /admin/config adds the manifests as "policy" / "clusterPolicy".
            "config": {"loaded": self.loaded, "version": policy.version if policy else 0,
                       "policyRef": policy.policy.ref if policy else None,
                       "clusterVersion": cluster_policy.version if cluster_policy else 0,
                       "clusterPolicyRef": cluster_policy.policy.name if cluster_policy else None,
                       # cluster mode: is the change-notice subscription up (config and keys)?
                       "notices": self.source.subscribed if isinstance(self.source, RedisSource) else None},
            # error: why decisions fail now (timeout, unavailable, auth, oom, refused), or None.
            "store": {"kind": self.store.name, "circuit": self.breaker.state.name.lower(),
                      "error": self.breaker.reason},
            "draining": self.draining,
        }

    def ready(self) -> bool:
        """Serving as designed, and not draining: a config is loaded, or, in cluster mode, none
        is needed to serve (``--without-config unlimited``: the injector's choice for a pod no
        policy selects or whose policies all fail open, so that a Redis outage does not hold up
        its rollout). A standalone policy file that cannot be loaded is a mistake to show: 503."""
        unneeded = self.settings.without_config == "unlimited" and isinstance(self.source, RedisSource)
        return (self.loaded or unneeded) and not self.draining

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"ready": ready, **self.components()}, status=200 if ready else 503)

    async def _config(self, request: web.Request) -> web.Response:
        policy, cluster_policy = self.limiter.policy, self.limiter.cluster_policy
        body: dict[str, Any] = self.components()
        from sluice_core.manifest import to_manifest

        if policy is not None:
            body["policy"] = to_manifest(policy.policy)
            body["apiKeys"] = _keys_summary(policy)  # how many, never which
        if cluster_policy is not None:
            body["clusterPolicy"] = to_manifest(cluster_policy.policy)
            body["clusterApiKeys"] = _keys_summary(cluster_policy)
        return web.json_response(body, dumps=lambda o: json.dumps(o, indent=2))

    # Lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind both ports, then load the config. Raises :class:`StartupError` (after which
        :meth:`stop` releases what was started): a port that cannot be bound, a policy file that
        cannot be loaded (unless ``--without-config unlimited``), an unreadable labels file."""
        s = self.settings
        host, port = split_hostport(s.listen, "listen")
        ahost, aport = split_hostport(s.admin_listen, "admin-listen")
        await self.proxy.start()
        data = DataServer(self.handle, self.metrics, max_connections=s.max_connections,
                          max_client_connections=s.max_connections_per_client,
                          trusts=self.limiter.trusts,
                          max_head_bytes=s.max_request_header_bytes, header_timeout=s.header_timeout_s,
                          client_timeout=s.client_timeout_s,
                          max_line_size=s.max_header_bytes, max_field_size=s.max_header_bytes,
                          max_headers=s.max_headers, keepalive_timeout=s.keepalive_timeout_s,
                          handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(data, shutdown_timeout=s.shutdown_timeout_s, access_log=None)
        self.data_port = await self._bind(runner, f"--listen {s.listen}", host, port, backlog=1024)
        self._data_runner = runner
        admin = web.Application()
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/readyz", self._readyz)
        admin.router.add_get("/admin/config", self._config)
        admin.router.add_get("/usage", self._usage)
        admin.router.add_get("/drain", self._drain_request)
        admin_runner = web.AppRunner(admin, access_log=None)
        self.admin_port = await self._bind(admin_runner, f"--admin-listen {s.admin_listen}", ahost, aport)
        if isinstance(self.source, FileSource):
            try:
                await self.source.start(required=s.without_config == "refuse")
            except NoConfig as exc:
                raise StartupError(exc.what, str(exc)) from None
        else:
            if s.pod_labels:  # cluster mode: a labels file that cannot be read never will be
                try:
                    read_labels(s.pod_labels)
                except (OSError, ValueError) as exc:
                    raise StartupError("--pod-labels", one_line(exc)) from None
            await self.source.start()
        log.info("sluice sidecar on %s:%s -> %s (admin %s:%s, store %s)", host, self.data_port,
                 s.upstream, ahost, self.admin_port, self.store.name)
        if isinstance(self.store, RedisStore):  # say a wrong password now, not at the first request
            self.breaker.start()
        if self.usage_flusher is not None:
            self.usage_flusher.start()

    async def _bind(self, runner: web.BaseRunner, what: str, host: str, port: int, **kw: Any) -> int:
        """Set up ``runner`` and listen on host:port; the bound port (for port 0)."""
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True, **kw).start()
        except OSError as exc:  # in use, not an address of this host, no such host, no permission
            raise StartupError(what, exc.strerror or str(exc)) from None
        return _bound_port(runner)

    async def drain(self, why: str = "SIGTERM") -> None:
        """Report not ready so the endpoint is removed, keep serving for ``drain_s`` (every
        response with ``Connection: close``), then stop accepting and let in-flight requests
        finish. Once, however many times it is asked (SIGTERM and ``/drain`` both come in a
        pod's termination when the sidecar is not a native sidecar)."""
        if self._drained is None:
            self._drained = asyncio.create_task(self._drain(why))
        await asyncio.shield(self._drained)

    async def _drain(self, why: str) -> None:
        self.draining = True
        log.info("draining (%s): not ready, serving for %.1f s more", why, self.settings.drain_s)
        await asyncio.sleep(self.settings.drain_s)
        runner, self._data_runner = self._data_runner, None
        if runner is not None:  # closes the listener, then waits for in-flight requests
            self._runners.remove(runner)
            await runner.cleanup()
        log.info("drained: no longer accepting connections")

    async def _drain_request(self, request: web.Request) -> web.Response:
        """``GET /drain`` with the ``X-Sluice-Drain-Token`` of ``--drain-token`` (the app's preStop
        hook): drain, then answer, so the kubelet stops the app only after this sidecar stopped
        sending it requests. Without the token it is refused: anyone who can reach the admin port
        could otherwise take the pod out of service."""
        token = self.settings.drain_token
        given = request.headers.get("X-Sluice-Drain-Token", "")
        if not token:
            return web.json_response({"drain": "off"}, status=404)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response({"drain": "refused"}, status=403)
        await self.drain("preStop hook")
        return web.json_response({"drained": True})

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        if self.usage_flusher is not None:  # after the last request: the partial window goes too
            await self.usage_flusher.close()
        await self.source.close()
        await self.proxy.close()
        await self.breaker.close()
        await self.store.close()


def _keys_summary(e: Enforcement) -> int | dict[str, Any]:
    """The number of API keys loaded with the policy; for keys resolved from Redis grants, how
    many the grant cache holds (known and unknown)."""
    if e.grants is not None:
        return len(e.grants)
    return {"source": "redis", "cached": len(e.cache) if e.cache is not None else 0}


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def refusal(outcome: Outcome) -> web.Response:
    if outcome.status == 429:
        return problem(429, "Too Many Requests", outcome.detail, type_=RATE_LIMITED,
                       headers=outcome.headers, policy=outcome.policy_name, tier=outcome.tier,
                       rule=outcome.rule or None)
    if outcome.status == 401:
        return problem(401, "Unauthorized", outcome.detail, type_=API_KEY_REQUIRED,
                       headers=outcome.headers, policy=outcome.policy_name)
    return problem(outcome.status, "Service Unavailable", outcome.detail,
                   type_=LIMITER_UNAVAILABLE, headers=outcome.headers,
                   policy=outcome.policy_name)
