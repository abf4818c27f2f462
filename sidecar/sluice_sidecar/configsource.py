"""Where the sidecar's policy comes from, and how it keeps the last good one.

- :class:`FileSource`: a policy file (+ optional API-keys file), re-read when it changes.
- :class:`RedisSource`: the namespace's compiled config written by the operator or
  ``sluice apply``, and the cluster document (ClusterRateLimitPolicies); reloaded within a
  second of a change notice (pub/sub) and polled as a fallback. The namespace policy whose
  selector matches this pod's labels is enforced, and with it a cluster policy that selects
  this pod's namespace and labels.

Either way a broken or missing config never replaces a good one: the error is logged and
counted, and the previous :class:`Enforcement` keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice_core import keyschema
from sluice_core.apikeys import load_grants_file
from sluice_core.configdoc import NamespaceConfig, load_doc
from sluice_core.errors import PolicyErrors
from sluice_core.model import CLUSTER_SCOPE, CompiledPolicy, KeyGrant
from sluice_core.policyfile import load_policies
from sluice_core.sidecar_settings import DEFAULT_GRANT_CACHE_MAX_AGE_S, DEFAULT_GRANT_CACHE_SIZE

from sluice_sidecar.enforcement import Enforcement
from sluice_sidecar.labels import read_labels
from sluice_sidecar.metrics import Metrics
from sluice_sidecar.transport.errors import TransportError
from sluice_sidecar.transport.resp import RespConnection, encode
from sluice_sidecar.transport.topology import RedisNodes

log = logging.getLogger("sluice.config")
_KEYS_CHANNEL = keyschema.KEYS_CHANNEL.encode()
Apply = Callable[[Enforcement | None, Enforcement | None], None]
"""Called with the pod's namespace policy and its cluster policy (either may be None)."""
KeysChanged = Callable[[str | None, str | None], None]
"""Called with ``(policy id, client id)`` of a keys-changed notice: one key's grant changed;
``(policy id, None)``: many of that policy's; ``(None, None)``: notices may have been missed."""
NoticesUp = Callable[[bool], None]  # the change notices are (True) or may not be (False) heard
# The subscription is checked with a PING this often; no answer within the timeout counts as a
# lost connection. Without it a connection dropped silently (a NAT or conntrack entry expired, a
# partitioned Cluster node that no longer relays PUBLISH) looks subscribed while no notice comes.
SUBSCRIPTION_PING_S = 1.0
SUBSCRIPTION_PING_TIMEOUT_S = 1.0
MEMBERS_KEPT = 8  # heartbeat members remembered for withdrawal (a state change writes a new one)
WITHDRAW_TIMEOUT_S = 1.0


CAPABILITIES: frozenset[str] = frozenset({keyschema.CAPABILITY_REDIS_GRANTS})
"""What this sidecar can do that the operator may need to know before relying on it (the
heartbeat's ``capabilities``): it resolves API keys from Redis grants."""


class NoConfig(Exception):
    """A config could not be loaded: ``what`` names the flag, the message the file and why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(reason)
        self.what = what


def one_line(exc: Exception) -> str:
    """A reason on one line (a policy with several errors lists them all, joined)."""
    return "; ".join(line for line in str(exc).splitlines() if line) or type(exc).__name__


def select_policy(policies: list[CompiledPolicy] | tuple[CompiledPolicy, ...],
                  labels: dict[str, str] | None) -> CompiledPolicy | None:
    """The policy for this pod: the first by name whose selector matches (one policy per pod;
    several matching is a configuration mistake, reported in the log)."""
    matching = sorted((p for p in policies if labels is None or p.selector.matches(labels)),
                      key=lambda p: p.name)
    if len(matching) > 1:
        log.warning("several policies select this pod (%s); enforcing %s",
                    ", ".join(p.name for p in matching), matching[0].name)
    return matching[0] if matching else None


class FileSource:
    def __init__(self, policy_path: str, keys_path: str | None, metrics: Metrics, apply: Apply,
                 *, labels_path: str | None = None, poll_interval: float = 2.0) -> None:
        self.policy_path = policy_path
        self.keys_path = keys_path
        self.labels_path = labels_path
        self.metrics = metrics
        self.apply = apply
        self.poll_interval = poll_interval
        self.version = 0
        self._stamp: tuple[float, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def _stamps(self) -> tuple[float, ...]:
        paths = [p for p in (self.policy_path, self.keys_path, self.labels_path) if p]
        out = []
        for p in paths:
            try:
                out.append(os.stat(p).st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def _read(self) -> Enforcement:
        """The config the files describe now; raises :class:`NoConfig` naming the file at fault."""
        self._stamp = self._stamps()
        labels = None
        if self.labels_path:
            try:
                labels = read_labels(self.labels_path)
            except (OSError, ValueError) as exc:
                raise NoConfig("--pod-labels", one_line(exc)) from exc
        what = "--policy-file"  # the reasons below name the file
        try:
            policies = load_policies(self.policy_path)
        except (PolicyErrors, OSError, ValueError) as exc:
            raise NoConfig(what, one_line(exc)) from exc
        policy = select_policy(policies, labels)  # without labels every policy selects the pod
        if policy is None:
            raise NoConfig(what, f"{self.policy_path}: " + (
                "no policy in the file selects this pod" if policies else "no policy in the file"))
        grants: dict[str, KeyGrant] = {}
        if self.keys_path:
            try:
                grants = load_grants_file(self.keys_path, policy)
            except (PolicyErrors, OSError, ValueError) as exc:
                raise NoConfig("--api-keys-file", one_line(exc)) from exc
        return Enforcement(policy, grants, self.version + 1)

    def _use(self, enforcement: Enforcement) -> None:
        self.version = enforcement.version
        self.apply(enforcement, None)
        self.metrics.config_reloads.labels("ok").inc()
        self.metrics.config_version.labels(enforcement.policy.namespace).set(self.version)
        log.info("loaded policy %s from %s", enforcement.policy.ref, self.policy_path)

    def load(self) -> bool:
        """(Re)load; return True when a new config was applied."""
        try:
            enforcement = self._read()
        except NoConfig as exc:
            self.metrics.config_reloads.labels("invalid").inc()
            keeping = "keeping the last good config" if self.version else "no config loaded yet"
            log.error("policy not loaded (%s): %s: %s", keeping, exc.what, exc)
            return False
        self._use(enforcement)
        return True

    async def start(self, *, required: bool = False) -> None:
        """Load the files and watch them. ``required``: a config that cannot be loaded now raises
        :class:`NoConfig` (logging nothing: the caller reports it, once) instead of starting
        without one."""
        if required:
            self._use(self._read())
        else:
            self.load()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if self._stamps() != self._stamp:
                self.load()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class _Doc:
    """One config document in Redis, as this sidecar last saw it."""

    namespace: str
    version: int = 0  # version last seen (applied or found broken); 0: missing
    config: NamespaceConfig | None = None  # the last good one

    @property
    def key(self) -> str:
        return keyschema.config_key(self.namespace)


def select_cluster_policy(config: NamespaceConfig | None, namespace: str,
                          labels: dict[str, str] | None) -> CompiledPolicy | None:
    """The cluster policy for this pod: its namespace is one the policy's namespaceSelector
    resolved to (the operator resolves it: a sidecar cannot read namespace labels) and its
    selector matches the pod's labels."""
    if config is None:
        return None
    return select_policy([p for p in config.policies if namespace in config.scopes.get(p.name, ())],
                         labels)


class RedisSource:
    def __init__(self, nodes: RedisNodes, namespace: str, metrics: Metrics, apply: Apply, *,
                 labels_path: str | None, pod_name: str | None = None,
                 poll_interval: float, heartbeat_interval: float = 10.0,
                 keys_changed: KeysChanged | None = None,
                 grant_cache_size: int = DEFAULT_GRANT_CACHE_SIZE,
                 grant_cache_max_age_s: float = DEFAULT_GRANT_CACHE_MAX_AGE_S,
                 notices_up: NoticesUp | None = None) -> None:
        self.nodes = nodes
        self.keys_changed = keys_changed
        self.notices_up = notices_up
        self.grant_cache_size = grant_cache_size
        self.grant_cache_max_age_s = grant_cache_max_age_s
        self.namespace = namespace
        self.metrics = metrics
        self.apply = apply
        self.labels_path = labels_path
        self.pod_name = pod_name
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self._policy_doc = _Doc(namespace)  # the namespace's RateLimitPolicies
        self._cluster_policy_doc = _Doc(CLUSTER_SCOPE)  # every ClusterRateLimitPolicy
        self.enforcing = keyschema.Heartbeat(0, 0.0, capabilities=CAPABILITIES)  # what the heartbeat reports
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: RespConnection | None = None
        # What was applied last (namespace policy, cluster policy): a reload carries their grant
        # caches over where it can (Enforcement.carry_cache).
        self._enforced: tuple[Enforcement | None, Enforcement | None] = (None, None)
        self._heartbeat_error: str | None = None  # the reason the last heartbeat failed
        self._said_waiting = False
        self._beat_now = asyncio.Event()  # a new config applied: report it now, not at the next beat
        # Heartbeat members this pod wrote (one per state it reported), removed when it stops:
        # a pod that is gone must not count as enforcing until its beat goes stale (#12, defect 5).
        self._members: list[str] = []

    @property
    def subscribed(self) -> bool:
        """Is the change-notice subscription up (and the grant cache emptied since it came)?"""
        return self._sub is not None and not self._sub.closed

    async def _command(self, key: str, *args: Any) -> Any:
        """Run one command on the node that owns ``key`` (cluster-aware)."""
        conn = await self.nodes.for_key(key)
        return await conn.call(*args)

    async def _refresh(self, doc: _Doc) -> bool:
        """Read ``doc`` if its version changed; True when a new good config was loaded.
        Raises on Redis trouble and on an invalid document (its version then counts as seen)."""
        version_raw = await self._command(doc.key, "HGET", doc.key, "version")
        version = int(version_raw) if version_raw is not None else 0
        if version == doc.version:
            return False
        if version == 0:
            # Missing: Redis lost it. Keep enforcing what we have (the operator re-pushes lost
            # config on its timer). A namespace without a policy has no document either: the
            # cluster document, which always exists once the operator or `sluice apply` ran,
            # then tells that Redis is initialised and this pod is under no namespace policy.
            if doc.version:
                log.warning("config %s is gone from Redis; keeping version %s", doc.namespace, doc.version)
            doc.version = 0
            return False
        ver_raw, text = await self._command(doc.key, "HMGET", doc.key, "version", "doc")
        if text is None:
            return False
        doc.version = int(ver_raw) if ver_raw is not None else 0
        config = load_doc(text, doc.version)
        if config.placeholder and doc.config is not None:
            # Written where Redis had no document (it lost everything): nothing new to enforce.
            log.warning("config %s version %s is a placeholder; keeping the last good one",
                        doc.namespace, doc.version)
            return False
        doc.config = config
        return True

    async def check(self) -> bool:
        """Load the config if either document changed; return True when a new one was applied."""
        changed = False
        for doc in (self._policy_doc, self._cluster_policy_doc):
            try:
                changed = await self._refresh(doc) or changed
            except TransportError as exc:
                self.metrics.config_reloads.labels("unreachable").inc()
                log.warning("cannot read config from Redis (keeping the last good one): %s", exc)
                return False
            except (PolicyErrors, ValueError) as exc:
                self.metrics.config_reloads.labels("invalid").inc()
                log.error("config %s version %s is invalid (keeping the last good one): %s",
                          doc.namespace, doc.version, exc)
        if not changed:
            self._say_waiting()
            return False
        try:
            labels = read_labels(self.labels_path) if self.labels_path else None
        except (OSError, ValueError) as exc:
            self.metrics.config_reloads.labels("invalid").inc()
            log.error("cannot read this pod's labels (keeping the last good config): %s", exc)
            return False
        ns_config, cluster_config = self._policy_doc.config, self._cluster_policy_doc.config
        ns_version, cluster_version = self._policy_doc.version, self._cluster_policy_doc.version
        policy = select_policy(ns_config.policies, labels) if ns_config is not None else None
        cluster_policy = select_cluster_policy(cluster_config, self.namespace, labels)
        self.enforcing = keyschema.Heartbeat(
            ns_version, 0.0, policy.name if policy else None,
            cluster_version, cluster_policy.name if cluster_policy else None, CAPABILITIES)
        self._beat_now.set()
        if policy is None and cluster_policy is None:
            self.metrics.config_reloads.labels("no_policy").inc()
            log.warning("no policy selects this pod (namespace %s, config version %s, cluster "
                        "config version %s)", self.namespace, ns_version, cluster_version)
            self._enforced = (None, None)
            self.apply(None, None)
            return True
        # A document that embeds no apiKeys for the policy: its keys are Redis grants (None).
        enforced = (
            Enforcement(policy, ns_config.grants.get(policy.name), ns_version, self.grant_cache_size,
                        self.grant_cache_max_age_s)
            if policy and ns_config else None,
            Enforcement(cluster_policy, cluster_config.grants.get(cluster_policy.name),
                        cluster_version, self.grant_cache_size, self.grant_cache_max_age_s)
            if cluster_policy and cluster_config else None)
        for new, old in zip(enforced, self._enforced, strict=True):
            if new is not None:
                new.carry_cache(old)
        self._enforced = enforced
        self.apply(*enforced)
        self.metrics.config_reloads.labels("ok").inc()
        for doc in (self._policy_doc, self._cluster_policy_doc):
            if doc.version:
                self.metrics.config_version.labels(doc.namespace).set(doc.version)
        log.info("enforcing %s", " and ".join(
            f"{p.ref} (config version {v})" for p, v in ((policy, ns_version),
                                                        (cluster_policy, cluster_version)) if p))
        return True

    def _say_waiting(self) -> None:
        """Once: Redis answers but holds neither this namespace's document nor the cluster one,
        so no config can load (a pod here otherwise waits in silence)."""
        if self._said_waiting or self._policy_doc.config or self._cluster_policy_doc.config:
            return
        self._said_waiting = True
        log.warning("no config yet: Redis holds no document for namespace %s and no cluster document "
                    "(written by the operator, or `sluice apply`, connected to this Redis); until one "
                    "comes, --without-config applies", self.namespace)

    async def start(self) -> None:
        await self.check()
        self._tasks = [asyncio.create_task(self._subscribe()), asyncio.create_task(self._poll())]
        if self.pod_name:
            self._tasks.append(asyncio.create_task(self._heartbeat()))

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.check()

    def _on_message(self, reply: Any) -> None:
        # ["message", channel, "<namespace> <version>" | "<policy id> <client id>"]
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return
        first, _, second = reply[2].decode(errors="replace").partition(" ")
        if reply[1] == _KEYS_CHANNEL:
            if self.keys_changed is not None:
                self.keys_changed(first, None if second == keyschema.ALL_KEYS else second)
        elif first in (self.namespace, CLUSTER_SCOPE):
            self._wake.set()

    async def _subscribe(self) -> None:
        backoff = 0.1
        while True:
            try:
                conn = await self.nodes.subscribe(
                    (keyschema.CONFIG_CHANNEL, keyschema.KEYS_CHANNEL), self._on_message)
                backoff = 0.1
                self._wake.set()  # anything published while we were away: check now
                if self.keys_changed is not None:
                    self.keys_changed(None, None)  # and forget every cached grant, likewise
                self._sub = conn
                if self.notices_up is not None:
                    self.notices_up(True)
                await self._watch(conn)
            except TransportError as exc:
                log.debug("config subscription failed: %s", exc)
            except Exception:  # never let the subscription loop die
                log.exception("config subscription crashed")
            if self.notices_up is not None:
                self.notices_up(False)  # until subscribed again: no grant is cached
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    @staticmethod
    async def _watch(conn: RespConnection) -> None:
        """Until ``conn`` is lost: PING it every SUBSCRIPTION_PING_S; a PING unanswered within
        SUBSCRIPTION_PING_TIMEOUT_S drops it (the caller subscribes again)."""
        while not conn.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUBSCRIPTION_PING_S):
                    await asyncio.shield(conn.lost)
            if conn.closed:
                return
            try:
                await conn.call("PING", timeout=SUBSCRIPTION_PING_TIMEOUT_S)
            except TransportError as exc:
                log.warning("change-notice subscription silent (%s); subscribing again", exc)
                conn.abort(exc)
                return

    async def _heartbeat(self) -> None:
        """Report the config version this pod enforces, so the operator can say how many
        sidecars run each version: in the one sorted set of all namespaces that the operator
        reads in one command an interval (keyschema.HEARTBEATS_KEY)."""
        assert self.pod_name
        ttl_ms = int(self.heartbeat_interval * 3 * 1000)
        beats = 0
        while True:
            try:
                now = time.time()
                beat = dataclasses.replace(self.enforcing, at=now)
                member = keyschema.heartbeat_member(self.namespace, self.pod_name, beat)
                glob = await self.nodes.for_key(keyschema.HEARTBEATS_KEY)
                # All written at once; all awaited, so a refused write (an ACL, OOM, a
                # READONLY replica) is reported here rather than left in a future nobody reads.
                sent = [glob.send(encode("ZADD", keyschema.HEARTBEATS_KEY, f"{now:.0f}", member)),
                        glob.send(encode("PEXPIRE", keyschema.HEARTBEATS_KEY, ttl_ms))]
                if beats % 16 == 0:  # stale members, should no operator run to prune them
                    sent.append(glob.send(encode("ZREMRANGEBYSCORE", keyschema.HEARTBEATS_KEY, "-inf",
                                                 f"({now - ttl_ms / 1000:.0f}")))
                beats += 1
                if member not in self._members:
                    self._members = [*self._members[-(MEMBERS_KEPT - 1):], member]
                for result in await asyncio.gather(*sent, return_exceptions=True):
                    if isinstance(result, BaseException):
                        raise result
            except TransportError as exc:
                self._heartbeat_failed(exc)
            else:
                if self._heartbeat_error is not None:
                    log.info("heartbeat written again; the operator counts this pod")
                    self._heartbeat_error = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._beat_now.wait()
            self._beat_now.clear()

    def _heartbeat_failed(self, exc: TransportError) -> None:
        """Counted every time; logged once per change of reason (as the breaker does): without
        a heartbeat the operator counts no sidecar on this config, and this line says why."""
        self.metrics.heartbeat_errors.labels(exc.reason).inc()
        if exc.reason != self._heartbeat_error:
            self._heartbeat_error = exc.reason
            log.warning("heartbeat not written (%s): %s; the operator does not count this pod "
                        "until it is", exc.reason, exc)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._sub is not None:
            self._sub.close()
        await self._withdraw_heartbeat()

    async def _withdraw_heartbeat(self) -> None:
        """This pod stops enforcing: its heartbeat goes, so the operator's count (``Enforced``)
        drops at its next count rather than when the beat goes stale. Bounded: a Redis that does
        not answer must not hold up the pod's exit (the beat then goes stale as before)."""
        if not self._members:
            return
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
                glob = await self.nodes.for_key(keyschema.HEARTBEATS_KEY)
                await glob.call("ZREM", keyschema.HEARTBEATS_KEY, *self._members)
        except (TransportError, TimeoutError) as exc:
            log.info("heartbeat not withdrawn (%s): it goes stale instead", exc)
        self._members = []


