"""The compiled, immutable form of a ``RateLimitPolicy``.

Everything here is already validated: the sidecar's hot path reads these objects and never
re-checks them. ``sluice_core.parse`` builds them from the YAML a user applies, and
``sluice_core.configdoc`` round-trips them through the JSON document kept in Redis.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from sluice_core.keyschema import IPV6_CLIENT_PREFIX
from sluice_core.paths import PathRegex, RequestPath, limiting_rule_text, request_path

API_VERSION = "sluice.dev/v1alpha1"
KIND = "RateLimitPolicy"
CLUSTER_KIND = "ClusterRateLimitPolicy"
CLUSTER_SCOPE = "_cluster"
"""The pseudo-namespace of cluster-scoped policies (no Kubernetes namespace can have this name):
their ``ref`` is ``_cluster/<name>`` and their config document is stored under it."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FailureMode(StrEnum):
    """What to do with a request when Redis cannot answer in time."""

    OPEN = "open"  # let it through (availability first)
    CLOSED = "closed"  # refuse it with 503 (protection first)


class Mode(StrEnum):
    ENFORCE = "enforce"  # refuse over-limit requests with 429
    SHADOW = "shadow"  # never refuse; count what would have been refused


class HeaderStyle(StrEnum):
    DRAFT = "draft"  # RateLimit-Policy / RateLimit (IETF httpapi draft)
    LEGACY = "legacy"  # X-RateLimit-Limit / -Remaining / -Reset
    BOTH = "both"
    NONE = "none"  # Retry-After on 429 only


class Source(StrEnum):
    """Where a client's identity comes from; ``Identify.order`` lists them by preference."""

    API_KEY = "apiKey"
    HEADER = "header"
    IP = "ip"


class HeaderFrom(StrEnum):
    """Which TCP peers may name the client with the identity header (``Source.HEADER``)."""

    TRUSTED_PROXIES = "trustedProxies"  # only peers in trustedProxies
    # ... and the pod's own loopback: an auth layer in the pod, in front of Sluice, sets it
    TRUSTED_PROXIES_OR_LOOPBACK = "trustedProxiesOrLoopback"


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: ``requests`` tokens per ``period_us``, holding at most ``burst`` tokens."""

    requests: int
    period_us: int
    burst: int

    @property
    def emission_us(self) -> int:
        """Whole microseconds to earn one token: ``period / requests`` rounded up.

        Rounding up keeps every bucket integer-exact (no drift from fractions) and can only
        make the limit stricter, by at most one microsecond per token."""
        return -(-self.period_us // self.requests)

    @property
    def capacity_us(self) -> int:
        """The bucket's depth in microseconds of refill (GCRA's tolerance): ``burst`` tokens."""
        return self.burst * self.emission_us

    @property
    def window_s(self) -> int:
        """The time the bucket takes to refill from empty to full (``burst x period /
        requests``), in whole seconds rounded up: the ``w=`` of its ``RateLimit-Policy``, whose
        ``q=`` is ``burst``, so the announced rate is never above the real one."""
        return -(-self.burst * self.period_us // (self.requests * 1_000_000))


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    limit: Limit


@dataclass(frozen=True, slots=True)
class PathMatch:
    """Exactly one of the three is set, as the policy spells it (see :mod:`sluice_core.paths`
    for how each is compared)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A per-route rule: the first rule whose path and method match a request decides it."""

    name: str
    path: PathMatch | None
    methods: frozenset[str] | None  # None: any method
    limit: Limit | None  # its own bucket per client, checked with the tier bucket
    cost: int  # tokens taken from every bucket the request checks
    skip: bool  # not limited at all
    # ``path.regex`` compiled once by ``parse`` (paths.compile_regex, with the policy's budget).
    regex: PathRegex | None = field(default=None, compare=False, repr=False)
    # The methods the rule matches: a limiting rule that lists GET matches HEAD too (frameworks
    # answer HEAD with the GET handler, which does the same work); a skip rule only those listed.
    matched_methods: frozenset[str] | None = field(default=None, init=False, compare=False,
                                                   repr=False)
    # How an exact or prefix path is compared, prepared once: a limiting rule's read like a
    # request target (paths.limiting_rule_text), a skip rule's as written.
    _text: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        methods = self.methods
        if methods is not None and not self.skip and "GET" in methods:
            methods = methods | {"HEAD"}
        object.__setattr__(self, "matched_methods", methods)
        p = self.path
        if p is None:
            return
        if p.regex is not None:
            if self.regex is None:
                raise ValueError(f"rule {self.name}: path.regex must come compiled (paths.compile_regex)")
        elif self.skip:
            object.__setattr__(self, "_text", p.exact if p.exact is not None else p.prefix)
        else:
            text = p.exact if p.exact is not None else p.prefix
            assert text is not None
            object.__setattr__(self, "_text", limiting_rule_text(text, prefix=p.exact is None))

    def matches(self, method: str, path: RequestPath) -> bool:
        if self.matched_methods is not None and method not in self.matched_methods:
            return False
        p = self.path
        if p is None:
            return True
        if self.skip:  # only the plain canonical spelling, compared exactly
            if not path.canonical:
                return False
            if p.exact is not None:
                return path.plain == self._text
            if p.prefix is not None:
                return path.plain.startswith(self._text)
            assert self.regex is not None
            return self.regex.fullmatch(path.plain_bytes)
        # A limiting rule: every spelling of the path (normalised, any case, trailing slash or not).
        if p.exact is not None:
            return path.folded == self._text
        if p.prefix is not None:  # folded_slashed starts with the text whenever folded does
            return path.folded_slashed.startswith(self._text)
        assert self.regex is not None
        # Two calls, not "(?:regex)/?": a pattern ending in "$" must still match without the slash.
        return self.regex.fullmatch(path.norm_bytes) or (path.slashed_bytes is not None
                                                          and self.regex.fullmatch(path.slashed_bytes))


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class Selector:
    """A Kubernetes label selector; the empty selector matches every pod."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


IPV6_PREFIX_MIN = 48  # shorter would put unrelated sites (a /48 each, RFC 6177) in one bucket


@dataclass(frozen=True, slots=True)
class Identify:
    """How a client is told apart; the first source in ``order`` that is present wins."""

    order: tuple[Source, ...] = (Source.API_KEY, Source.IP)
    header: str | None = None  # header name for Source.HEADER
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # From any other peer the header is ignored (the next source decides): anyone could send it.
    header_from: HeaderFrom = HeaderFrom.TRUSTED_PROXIES
    # An IPv6 client is its network of this many bits (every address of it shares its buckets).
    ipv6_prefix_length: int = IPV6_CLIENT_PREFIX


@dataclass(frozen=True, slots=True)
class ApiKeys:
    header: str = "X-API-Key"
    required: bool = False  # unknown or missing key -> 401 when True


@dataclass(frozen=True, slots=True)
class Usage:
    """``spec.usage``: how usage analytics report the policy's clients."""

    truncate_ips: bool = False  # an IP client as its /24 (IPv4) or /48 (IPv6), for privacy


class AlertPeriod(StrEnum):
    """The allowance a near-limit alert measures against: a calendar hour or day, in UTC."""

    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return 3600 if self is AlertPeriod.HOUR else 86400


@dataclass(frozen=True, slots=True)
class SecretKeyRef:
    """One key of a Kubernetes Secret, named, never read, by the policy: the Secret of a
    RateLimitPolicy is in the policy's namespace, the Secret of a ClusterRateLimitPolicy in the
    usage collector's own namespace (a tenant cannot name another namespace's Secret)."""

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class Webhook:
    """``spec.alerts[].webhook``: where the collector POSTs an alert, exactly one of ``url``
    (stored in the policy and every config document, so no secret) and ``secret_ref`` (a Secret
    holding the URL, read by the collector when it sends: for URLs that carry a token, as chat
    services' incoming webhooks do)."""

    url: str | None = None
    secret_ref: SecretKeyRef | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """``spec.alerts[]``: tell someone when a client has used ``percent`` of its tier's
    allowance for the current ``period`` (the tier's rate times the period). The usage
    collector detects it (never the request path), once per client and period."""

    name: str
    percent: int  # 1..100
    period: AlertPeriod
    tiers: frozenset[str] | None = None  # None: every tier
    webhook: Webhook | None = None  # where the collector POSTs the alert


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    namespace: str
    name: str
    selector: Selector
    identify: Identify
    api_keys: ApiKeys
    tiers: dict[str, Tier]  # insertion order = declaration order
    default_tier: str
    rules: tuple[Rule, ...]
    failure_mode: FailureMode
    mode: Mode
    headers: HeaderStyle
    cluster_scoped: bool = False
    namespace_selector: Selector | None = None  # cluster-scoped only: which namespaces' pods
    usage: Usage = Usage()  # spec.usage: how usage analytics report the policy's clients
    alerts: tuple[Alert, ...] = ()  # spec.alerts: near-limit alerts (the usage collector's)

    @property
    def ref(self) -> str:
        """``namespace/name``: unique per policy, used in bucket keys and messages."""
        return f"{self.namespace}/{self.name}"

    def match_rule(self, method: str, path: str) -> Rule | None:
        """The first rule matching ``path``, the request's path as sent (percent-encoded, no
        query): see :mod:`sluice_core.paths` for how spellings of a path are compared."""
        if not self.rules:
            return None
        rp = request_path(path)
        for rule in self.rules:
            if rule.matches(method, rp):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What an API key (known only by its SHA-256 hash) is entitled to."""

    tier: str
    limit: Limit | None = None  # per-key override of the tier's bucket
    # How usage reports name the key (a Secret's name, a keys file's ``id``); never the key.
    # Empty: not given (usage then names it by a short digest). Not part of what it grants.
    key_id: str = field(default="", compare=False)
