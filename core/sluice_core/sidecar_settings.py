"""The sidecar's settings: every flag of ``sluice sidecar``, its ``SLUICE_<FLAG>`` variable,
default and meaning.

It lives in the core because it is a contract: the operator's injector writes these variables
into the pods it injects (``--sidecar-max-connections`` -> ``SLUICE_MAX_CONNECTIONS``) and
reads their defaults, help and checks from here instead of repeating them. The sidecar adds
the checks across flags (standalone or cluster mode) in ``sluice_sidecar.settings``.
"""

from __future__ import annotations

from sluice_core.settingsform import LOG_LEVELS, setting, settings_form

DEFAULT_MAX_BUCKETS = 50_000
"""About 240 bytes a bucket (measured: CPython, a one-tier IPv4/IPv6 client key), so about
12 MiB when full: well inside the sidecar's default 128 MiB limit together with the ~50 MiB
process and its bounded client connections. Past it the least recently written bucket is
dropped: that client starts again with a full bucket (limits loosen, nothing fails)."""

DEFAULT_GRANT_CACHE_SIZE = 20_000
"""API keys resolved from Redis grants and cached per policy: this many known keys, and as many
unknown ones. Measured (bench/keys_sidecar.py, tracemalloc): about 210 bytes a known key and 150
an unknown one, so at most ~7 MiB per policy, ~14 MiB for a pod under two policies: inside the
sidecar's default 128 MiB limit beside its ~53 MiB process, whatever the number of keys in Redis.
A key that dropped out costs nothing but a little CPU: its next request resolves it in the
decision call it makes anyway (measured: about 8 µs of sidecar CPU a request)."""

DEFAULT_MAX_KEY_RESOLVES = 64
"""Grant-cache misses in Redis at once, per sidecar: what a flood of random API keys can make
a sidecar ask of Redis beyond its ordinary decisions (each resolve is one script call, batched
with the others of its event-loop turn). A quarter of the default --max-inflight-requests, so
keys that resolve never hold every request slot, and well above what a sidecar's real keys
need at once (a known key is cached after its first resolve)."""

DEFAULT_GRANT_CACHE_MAX_AGE_S = 1.0
"""How long a cached grant (or a key cached as unknown) is trusted without a fresh read: the
bound on a revocation whose change notice was lost (a silently dropped pub/sub connection, a
partitioned Cluster node), the issue's "within a second". Its cost: each hot key is resolved
again once a second per sidecar, a resolve decision in place of the ordinary one (the same one
round trip; the script also reads the grant, and the sidecar decodes it)."""

DEFAULT_USAGE_MAX_CLIENTS = 1_000
DEFAULT_USAGE_MAX_ENDPOINTS = 100
"""Usage analytics, per sidecar and flush window: clients and endpoints counted by name at most
(the rest fold into ``(other)``, counted). The rows of a window are also bounded by
``sluice_core.usage.MAX_ROWS`` whatever these are; about 400 bytes a row in memory."""


@settings_form(env_prefix="SLUICE_")
class SidecarSettings:
    """Documented in README.md ("Sidecar flags"), whose table is made from these fields."""

    upstream: str = setting(help="the app, `http://HOST:PORT` — the only address ever contacted")
    listen: str = setting(default="0.0.0.0:8080", help="HOST:PORT for client traffic")
    admin_listen: str = setting(default="0.0.0.0:9090", help="HOST:PORT for `/metrics`, `/healthz`, `/readyz`, `/admin/config`, `/usage`")
    redis: str | None = setting(
        default=None, help="Redis URL shared by all replicas (`redis://`, `rediss://`, `redis+sentinel://`, "
              "`redis+cluster://`, see URLs below); without it buckets live in this process's memory",
        shown="– (in-memory store)")
    redis_ca_file: str | None = setting(
        default=None, help="CA bundle (PEM) that verifies a `rediss://` Redis whose URL names none "
              "(`ssl_ca_certs`): a private CA. The injector sets it where the operator has one "
              "(`--sidecar-redis-ca-file`)", shown="– (the system's CAs)", metavar="PATH")
    policy_file: str | None = setting(default=None, help="standalone mode: a RateLimitPolicy YAML file (re-read when it changes)")
    api_keys_file: str | None = setting(default=None, help="standalone mode: YAML of API key -> tier for the policy")
    without_config: str = setting(
        default="refuse", help="before a config has ever loaded: `refuse` (standalone: exit at start; cluster mode: "
                  "answer 503, `/readyz` 503) or `unlimited` (proxy every request unlimited, counted "
                  "`unconfigured`; `/readyz` 200 in cluster mode, where the injector chooses it for a pod "
                  "no policy selects or whose policies all fail open, 503 in standalone mode)",
        choices=("refuse", "unlimited"))
    namespace: str | None = setting(default=None, help="cluster mode: read this namespace's compiled config from Redis")
    pod_labels: str | None = setting(
        default=None, help="cluster mode: downward-API labels file used to pick the policy whose selector matches")
    pod_name: str | None = setting(
        default=None, help="cluster mode: this pod's name, the heartbeat key with the config version it enforces "
              "(the operator aggregates them)")
    redis_timeout_ms: int = setting(
        default=50, help="give up on a Redis decision after this long (then the policy's failure mode applies)",
        positive=True)
    redis_connect_timeout_ms: int = setting(default=500, help="give up connecting to Redis after this long", positive=True)
    breaker_threshold: int = setting(
        default=5, help="consecutive Redis failures (timeouts, lost connections, failed authentication) that "
           "open the circuit breaker", positive=True)
    breaker_cooldown_s: float = setting(
        default=2.0, help="seconds after the breaker opens before it probes Redis in the background; then every "
             "0.1 s while Redis is unreachable or slow, once per cooldown while it answers with an "
             "error (a wrong password), until a probe passes and it closes", positive=True)
    upstream_connect_timeout_s: float = setting(default=2.0, help="connect timeout to the upstream (then 502)", positive=True)
    upstream_timeout_s: float = setting(
        default=60.0, help="read timeout between upstream bytes (then 504; once the response head is out the "
              "client connection is aborted)", positive=True)
    upstream_max_connections: int = setting(default=1024, help="pooled keep-alive upstream connections at most", positive=True)
    poll_interval_s: float = setting(
        default=5.0, help="cluster mode: poll Redis for config changes this often (pub/sub is the fast path)",
        positive=True)
    drain_s: float = setting(default=5.0, help="after SIGTERM, report not-ready and keep serving this long before closing")
    shutdown_timeout_s: float = setting(default=30.0, help="then wait at most this long for in-flight requests")
    drain_token: str | None = setting(
        default=None, help="enables `GET /drain` on the admin port for callers sending it as `X-Sluice-Drain-Token`: "
              "the same drain as SIGTERM, answered once no new connection is accepted and in-flight "
              "requests are done (the injector's preStop hook on the app container, so the app stops "
              "only after the sidecar stopped sending it requests)", shown="– (`/drain` off)")
    max_header_bytes: int = setting(
        default=8190, help="longest request line / header field accepted (longer → 431, connection closed)", positive=True)
    max_request_header_bytes: int = setting(
        default=16384, help="largest request head: request line and all header fields together (larger → 431, "
               "connection closed)", positive=True)
    max_headers: int = setting(default=100, help="most header fields in one request (more → 431, connection closed)",
                               positive=True)
    header_timeout_s: float = setting(
        default=10.0, help="a new connection's first request head must be complete this long after the connection "
              "opened (its first byte does not restart the clock), and every later head this long "
              "after its first byte; else the connection is closed without an answer", positive=True)
    keepalive_timeout_s: float = setting(
        default=75.0, help="close a keep-alive client connection idle this long (longer than the usual 60 s of "
              "load balancers, so they close first)", positive=True)
    client_timeout_s: float = setting(
        default=30.0, help="between bytes, both ways (nginx's `send_timeout` and `client_body_timeout`): a client "
              "that takes no byte of its response this long is aborted (the head is out: it sees a "
              "truncated response); one that sends no byte of its request body this long is answered "
              "`408` and closed. Long enough for a mobile client through a few TCP retransmissions "
              "(1+2+4+8+16 s of backoff), short enough that a stalled client's in-flight slot and "
              "buffers (about 110 KiB) come back", positive=True)
    max_connections: int = setting(
        default=1024, help="open client connections at most; one more is answered `503` (problem+json, "
              "`Connection: close`) and closed", positive=True)
    max_connections_per_client: int = setting(
        default=256, help="open connections from one client address (an IPv6 client: its /64) at most; one more "
             "is answered `503` and closed, so one host takes at most a quarter of the default table. "
             "The loaded policy's `trustedProxies` are exempt (behind an ingress every connection "
             "comes from it): list an ingress there even when the policy identifies clients by API "
             "key, and list a NAT that gives many clients one address (kube-proxy's SNAT of a "
             "LoadBalancer Service) or raise this; until a policy loads nobody is exempt", positive=True)
    max_inflight_requests: int = setting(
        default=256, help="requests being decided or proxied at once at most; one more is answered `503` at once "
             "(`Retry-After: 1`, no token taken)", positive=True)
    memory_max_buckets: int = setting(
        default=DEFAULT_MAX_BUCKETS, help="in-memory store: most buckets kept (the least recently written dropped "
                             "past it; about 240 bytes each: 50,000 is ~12 MiB)", positive=True)
    grant_cache_size: int = setting(
        default=DEFAULT_GRANT_CACHE_SIZE,
        help="cluster mode, a policy whose keys live in Redis grants: most API keys cached per policy, "
             "known ones and as many unknown ones (least recently used dropped past it; a dropped key "
             "is resolved again in its next decision call)", positive=True)
    max_key_resolves: int = setting(
        default=DEFAULT_MAX_KEY_RESOLVES,
        help="cluster mode, a policy whose keys live in Redis grants: API keys being resolved from Redis at "
             "once at most (grant-cache misses); one more is answered without Redis: `503` "
             "(`Retry-After: 1`) where a key is required, else as the anonymous client", positive=True)
    grant_cache_max_age_s: float = setting(
        default=DEFAULT_GRANT_CACHE_MAX_AGE_S,
        help="cluster mode, a policy whose keys live in Redis grants: a cached grant (or unknown key) is "
             "read again from Redis after this long, so a revocation whose change notice was lost "
             "still lands within it", positive=True)
    usage: str = setting(
        default="on", help="usage analytics: `on` counts every decision per policy, client, tier, endpoint, "
                           "outcome and upstream status class, one stream entry per window; `off` counts nothing",
        choices=("on", "off"))
    usage_window_s: float = setting(
        default=10.0, help="usage analytics: the flush window; at its end one `XADD` of what it counted to "
                           "`sluice:{usage}:windows`", positive=True)
    usage_max_clients: int = setting(
        default=DEFAULT_USAGE_MAX_CLIENTS, help="usage analytics: clients counted by name per window at most; "
                                                "the rest fold into `(other)` (counted as folded)", positive=True)
    usage_max_endpoints: int = setting(
        default=DEFAULT_USAGE_MAX_ENDPOINTS, help="usage analytics: endpoints counted by name per window at most; "
                                                  "the rest fold into `(other)`", positive=True)
    usage_stream_maxlen: int = setting(
        # 1,000: the stream's bound for when no collector trims it (a live one keeps only what
        # is unconsumed). Measured (bench/usage_stream_size.py): ~17 KB a window at 100 clients,
        # ~165 KB at 1,000: 17 MB and 165 MB; 100,000 was 1.7 and 16 GB beside the buckets.
        default=1_000, help="usage analytics: the stream keeps about this many entries (`XADD ... MAXLEN ~`), "
                            "so a collector that is down never fills Redis (sizing: README, usage analytics)",
        positive=True)
    usage_retries: int = setting(
        default=6, help="usage analytics: a window Redis did not take is sent again with the next windows this "
                        "many times, then dropped (`sluice_usage_dropped_windows_total`)", positive=True)
    usage_redis: str | None = setting(
        default=None, help="usage analytics: the Redis URL the windows go to, for the in-memory store (or another "
                           "Redis than `--redis`); without it and `--redis`, usage is only at the admin port's `/usage`",
        shown="– (`--redis`, else `/usage` only)")
    log_level: str = setting(default="info", help="`debug`, `info`, `warning` or `error`", choices=LOG_LEVELS)
