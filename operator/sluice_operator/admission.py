"""Admission webhooks as pure functions over ``admission.k8s.io/v1`` AdmissionReview dicts.

- :func:`review_policy` (validating, ``RateLimitPolicy`` and ``ClusterRateLimitPolicy``):
  runs :func:`sluice_core.parse.parse_policy`, the same code as ``sluice check``. Errors refuse
  the object (422) naming every field and reason; valid-but-suspicious configs are admitted
  with warnings (``kubectl apply`` prints them).
- :func:`mutate_pod` (mutating, Pods): injects the enforcing sidecar. It never refuses a pod:
  anything that prevents injection becomes a warning and the pod is admitted unchanged.

How injection routes traffic without iptables: the sidecar takes over the app container's
*named* port (``http`` unless the ``sluice.dev/port`` annotation names another). The app
container's port keeps its number but is renamed ``<name>-app``; the sidecar listens on a
new port number (annotation ``sluice.dev/sidecar-port``, else ``InjectionSettings.sidecar_port``
or the next free one above it) under the original name, so a Service's ``targetPort: http``
now lands on the sidecar, which forwards to ``http://127.0.0.1:<app port>``. Probes that
named the port are rewritten to the app's port number: kubelet checks never pass through the
sidecar. A Service with a numeric ``targetPort`` still goes straight to the app.

Both functions return a complete AdmissionReview (``apiVersion``, ``kind``, ``response``),
ready to be serialised as the webhook's HTTP answer; a malformed review raises
:class:`ReviewError`.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable, Mapping
from typing import Any

from sluice_core.duration import format_duration_us
from sluice_core.errors import PolicyErrors
from sluice_core.model import (
    CLUSTER_KIND,
    KIND,
    CompiledPolicy,
    HeaderFrom,
    Limit,
    Mode,
    Rule,
    Source,
)
from sluice_core.parse import parse_policy
from sluice_core.paths import regex_never_matched

from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.injection.values import MAX_PORT_NAME, PORT_NAME_RE

ADMISSION_API_VERSION = "admission.k8s.io/v1"

INJECT_LABEL = "sluice.dev/inject"  # "true" on a pod or its namespace; "false" on a pod opts out
INJECTED_ANNOTATION = "sluice.dev/injected"  # set by the patch: "true"
PORT_ANNOTATION = "sluice.dev/port"  # name of the app's port the sidecar takes over
SIDECAR_PORT_ANNOTATION = "sluice.dev/sidecar-port"  # number the sidecar listens on
SIDECAR_NAME = "sluice-sidecar"
PODINFO_VOLUME = "sluice-podinfo"
PODINFO_MOUNT = "/etc/sluice/podinfo"
ADMIN_PORT_NAME = "sluice-admin"

_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
_WARNING_MAX = 256  # the API server truncates longer warnings


class ReviewError(ValueError):
    """The request body is not an AdmissionReview the webhook can answer (HTTP 400)."""


NamespaceLabels = Callable[[str], Mapping[str, str] | None]
"""Looks up a namespace's labels (None: unknown). Injected so tests need no cluster."""


# ---------------------------------------------------------------------------------------------
# AdmissionReview plumbing


def _request(review: Any) -> Mapping[str, Any]:
    if not isinstance(review, Mapping):
        raise ReviewError("body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != ADMISSION_API_VERSION:
        raise ReviewError(f"body must be an AdmissionReview of {ADMISSION_API_VERSION}")
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ReviewError("AdmissionReview.request with a uid is required")
    return request


def _answer(uid: str, allowed: bool, **extra: Any) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    response.update({k: v for k, v in extra.items() if v})
    if "warnings" in response:
        response["warnings"] = [w if len(w) <= _WARNING_MAX else w[: _WARNING_MAX - 1] + "…"
                                for w in response["warnings"]]
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


def error_review(uid: str, message: str) -> dict[str, Any]:
    """Allowed with a warning: for the mutating webhook, where nothing may block a pod."""
    return _answer(uid, True, warnings=[message])


# ---------------------------------------------------------------------------------------------
# Validating webhook: policies


def review_policy(review: Any) -> dict[str, Any]:
    """Validate a RateLimitPolicy / ClusterRateLimitPolicy CREATE or UPDATE."""
    request = _request(review)
    uid = request["uid"]
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE") or request.get("subResource"):
        return _answer(uid, True)  # DELETE, CONNECT, status updates: nothing to validate
    obj = request.get("object")
    kind = (request.get("kind") or {}).get("kind") if isinstance(request.get("kind"), Mapping) else None
    if kind not in (KIND, CLUSTER_KIND):
        return _answer(uid, True, warnings=[
            f"sluice policy webhook received a {kind or 'request without a kind'}; not validated"])
    if operation == "UPDATE" and isinstance(obj, Mapping):
        old = request.get("oldObject")
        if _get(obj, "metadata", "deletionTimestamp"):
            return _answer(uid, True)  # never block finalizer removal of a policy being deleted
        if isinstance(old, Mapping) and old.get("spec") == obj.get("spec"):
            return _answer(uid, True)  # metadata-only change (labels, finalizers): spec unchanged
    namespace = request.get("namespace") or "default"
    name = request.get("name") or ""
    try:
        policy = parse_policy(obj, default_namespace=namespace)
    except PolicyErrors as exc:
        lines = [f"{e.path or '(object)'}: {e.reason}" for e in exc.errors]
        what = f"{kind} {name!r}" if name else kind
        message = f"{what} is invalid: " + "; ".join(lines)
        causes = [{"field": e.path, "message": e.reason, "reason": "FieldValueInvalid"}
                  for e in exc.errors]
        return _answer(uid, False, status={
            "status": "Failure", "code": 422, "reason": "Invalid", "message": message,
            "details": {"name": name, "group": "sluice.dev",
                        "kind": kind, "causes": causes},
        })
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    return _answer(uid, True, warnings=policy_warnings(policy, spec if isinstance(spec, Mapping) else {}))


def _rate(limit: Limit) -> str:
    return f"{limit.requests}/{format_duration_us(limit.period_us)} (burst {limit.burst})"


def _at_least_as_generous(a: Limit, b: Limit) -> bool:
    """``a`` refills at least as fast as ``b`` and holds at least as many tokens."""
    return a.requests * b.period_us >= b.requests * a.period_us and a.burst >= b.burst


def policy_warnings(policy: CompiledPolicy, spec: Mapping[str, Any]) -> list[str]:
    """Valid-but-suspicious configurations, each naming the field."""
    warnings: list[str] = []
    tiers = list(policy.tiers.values())
    for i, tier in enumerate(tiers):
        if tier.limit.burst > 10 * tier.limit.requests:
            warnings.append(
                f"spec.tiers[{i}].burst: {tier.limit.burst} is more than 10 × requests "
                f"({tier.limit.requests}): a client can spend "
                f"{tier.limit.burst // tier.limit.requests} periods' worth at once")
    for i, rule in enumerate(policy.rules):
        if rule.limit is not None:
            looser = [t.name for t in tiers if _at_least_as_generous(rule.limit, t.limit)]
            if looser:
                whom = "any tier" if len(looser) == len(tiers) else "tier " + ", ".join(looser)
                warnings.append(
                    f"spec.rules[{i}].limit: {_rate(rule.limit)} is at least as generous as "
                    f"{whom}: the tier's bucket always runs out first, this limit never binds")
        regex = rule.path.regex if rule.path is not None else None
        never = regex_never_matched(regex) if regex is not None else []
        if never:
            warnings.append(
                f"spec.rules[{i}].match.path.regex: mentions {' and '.join(map(repr, never))}, "
                "which a path matched against it never contains (';params' and '//' are "
                "dropped, escapes decoded: '~', not '%7E'): that part never matches")
        for j, earlier in enumerate(policy.rules[:i]):
            if _covers(earlier, rule):
                warnings.append(f"spec.rules[{i}]: never matches, spec.rules[{j}] "
                                f"({earlier.name}) comes first and matches every request it would")
                break
    if len(tiers) > 1 and Source.API_KEY not in policy.identify.order:
        warnings.append(f"spec.tiers: {len(tiers)} tiers but 'apiKey' is not in "
                        f"spec.identify.order: every client gets the default tier "
                        f"{policy.default_tier!r}")
    ident = policy.identify
    if Source.API_KEY in ident.order and ident.order[0] is not Source.API_KEY:
        # A known key carries the client's tier, so it always identifies first (limiter._plan).
        warnings.append("spec.identify.order: a known API key identifies its client before any "
                        "other source, whatever its place in the list; list 'apiKey' first "
                        "to say so")
    if (Source.HEADER in ident.order and not ident.trusted_proxies
            and ident.header_from is HeaderFrom.TRUSTED_PROXIES):
        warnings.append(f"spec.identify.headerFrom: no peer may set {ident.header} "
                        f"(spec.identify.trustedProxies is empty), so the header source never "
                        f"applies; list the proxy that sets it, or use trustedProxiesOrLoopback")
    if policy.mode is Mode.SHADOW:
        warnings.append("spec.mode: shadow never refuses a request; over-limit requests are "
                        "only counted (shadow_limited). Set enforce to limit")
        if spec.get("failureMode") == "closed":
            warnings.append("spec.failureMode: closed has no effect while spec.mode is shadow "
                            "(a shadow policy lets requests through when Redis is down)")
    if not policy.cluster_scoped and not spec.get("selector"):
        warnings.append(f"spec.selector is empty: this policy applies to every injected pod in "
                        f"namespace {policy.namespace!r}")
    if policy.cluster_scoped and not spec.get("namespaceSelector") and not spec.get("selector"):
        warnings.append("spec.namespaceSelector and spec.selector are empty: every injected pod of "
                        "every namespace shares this one budget")
    return warnings


def _covers(earlier: Rule, later: Rule) -> bool:
    """Conservative: True only when ``earlier`` surely matches every request ``later`` does."""
    em, lm = earlier.matched_methods, later.matched_methods
    if em is not None and (lm is None or not lm <= em):
        return False
    ep, lp = earlier.path, later.path
    if ep is None:
        return True
    if earlier.skip and not later.skip:  # a skip rule matches fewer spellings (sluice_core.paths)
        return False
    if ep.regex is not None or lp is None or lp.regex is not None:
        return False
    if ep.exact is not None:
        return lp.exact == ep.exact
    assert ep.prefix is not None
    text = lp.exact if lp.exact is not None else lp.prefix
    return text is not None and text.startswith(ep.prefix)


# ---------------------------------------------------------------------------------------------
# Mutating webhook: sidecar injection


def mutate_pod(review: Any, settings: InjectionSettings,
               namespace_labels: NamespaceLabels | None = None) -> dict[str, Any]:
    """Inject the sidecar into a pod CREATE; always allowed (problems become warnings)."""
    request = _request(review)
    uid = request["uid"]
    pod = request.get("object")
    if request.get("operation") != "CREATE" or not isinstance(pod, Mapping):
        return _answer(uid, True)
    namespace = _pod_namespace(request, pod)
    try:
        wanted, why_not = _wants_injection(pod, namespace, namespace_labels)
        if not wanted:
            return _answer(uid, True, warnings=[why_not] if why_not else [])
        patch, warnings = plan_injection(pod, settings)
    except Exception as exc:  # never block a pod because of a bug or an odd manifest
        return _answer(uid, True, warnings=[f"sluice: sidecar not injected: internal error: {exc!r}"])
    if not patch:
        return _answer(uid, True, warnings=warnings)
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return _answer(uid, True, patchType="JSONPatch", patch=encoded, warnings=warnings)


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _pod_choice(pod: Any) -> bool | None:
    """The pod's own ``sluice.dev/inject`` label: True, False (an opt-out wins over the
    namespace's label), or None when its namespace decides."""
    labels = _get(pod, "metadata", "labels")
    own = labels.get(INJECT_LABEL) if isinstance(labels, Mapping) else None
    return {"true": True, "false": False}.get(own) if isinstance(own, str) else None


def namespace_to_look_up(review: Any) -> str | None:
    """The namespace whose labels decide injection for this review, or None when there is no
    need to read them (not a pod CREATE, or the pod's own label decides): spares the API
    server a namespace read per pod."""
    request = review.get("request") if isinstance(review, Mapping) else None
    if not isinstance(request, Mapping) or request.get("operation") != "CREATE":
        return None
    pod = request.get("object")
    if not isinstance(pod, Mapping) or _pod_choice(pod) is not None:
        return None
    return _pod_namespace(request, pod)


def _pod_namespace(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    ns = request.get("namespace") or _get(pod, "metadata", "namespace")
    return ns if isinstance(ns, str) and ns else "default"


def _wants_injection(pod: Mapping[str, Any], namespace: str,
                     namespace_labels: NamespaceLabels | None) -> tuple[bool, str | None]:
    own = _pod_choice(pod)
    if own is not None:
        return own, None
    if namespace_labels is None:
        return False, None
    try:
        ns_labels = namespace_labels(namespace) or {}
    except Exception as exc:
        return False, (f"sluice: sidecar not injected: labels of namespace {namespace!r} "
                       f"could not be read ({exc})")
    return ns_labels.get(INJECT_LABEL) == "true", None


def _is_injected(pod: Mapping[str, Any]) -> bool:
    if (_get(pod, "metadata", "annotations") or {}).get(INJECTED_ANNOTATION) == "true":
        return True
    spec = pod.get("spec") or {}
    return any(isinstance(c, Mapping) and c.get("name") == SIDECAR_NAME
               for key in ("containers", "initContainers") for c in spec.get(key) or [])


def app_port_name(base: str, taken: set[str]) -> str:
    """``<base>-app`` shortened to 15 characters, unique among ``taken``."""
    for n in ["", *map(str, range(2, 10))]:
        suffix = f"-app{n}"
        stem = base[: MAX_PORT_NAME - len(suffix)].rstrip("-")
        candidate = stem + suffix
        if candidate not in taken and PORT_NAME_RE.fullmatch(candidate):
            return candidate
    raise ValueError(f"no free name for the app's port {base!r}")


def _free_port(start: int, used: set[int]) -> int:
    port = start
    while port in used:
        port += 1
    if port > 65535:
        raise ValueError(f"no free port at or above {start}")
    return port


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def plan_injection(pod: Mapping[str, Any],
                   settings: InjectionSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSONPatch that injects the sidecar, or ``([], [why not])`` to leave the pod alone."""
    if _is_injected(pod):
        return [], []
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = pod.get("spec") or {}
    containers = [c for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    init_containers = [c for c in spec.get("initContainers") or [] if isinstance(c, Mapping)]
    port_name = annotations.get(PORT_ANNOTATION) or settings.default_port_name

    def skip(reason: str) -> tuple[list[dict[str, Any]], list[str]]:
        return [], [f"sluice: sidecar not injected: {reason}; the pod runs without rate limiting"]

    found = [(ci, pi, p) for ci, c in enumerate(containers)
             for pi, p in enumerate(c.get("ports") or [])
             if isinstance(p, Mapping) and p.get("name") == port_name]
    if not found:
        named = sorted({p["name"] for c in containers for p in c.get("ports") or []
                        if isinstance(p, Mapping) and p.get("name")})
        hint = (f"named ports are {', '.join(named)}: set the {PORT_ANNOTATION} annotation"
                if named else "give the app's port a name (e.g. http)")
        return skip(f"no container port named {port_name!r} ({hint})")
    ci, pi, app_port = found[0]
    warnings: list[str] = []
    if len(found) > 1:
        warnings.append(f"sluice: several containers have a port named {port_name!r}; the "
                        f"sidecar fronts the first, container {containers[ci].get('name')!r}")
    if (app_port.get("protocol") or "TCP") != "TCP":
        return skip(f"port {port_name!r} is {app_port.get('protocol')}, the sidecar proxies HTTP over TCP")
    number = app_port.get("containerPort")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
        return skip(f"port {port_name!r} has no valid containerPort")
    if any(isinstance(v, Mapping) and v.get("name") == PODINFO_VOLUME for v in spec.get("volumes") or []):
        return skip(f"the pod already has a volume named {PODINFO_VOLUME!r}")

    all_ports = [p for c in [*containers, *init_containers] for p in c.get("ports") or []
                 if isinstance(p, Mapping)]
    used_numbers: set[int] = {p["containerPort"] for p in all_ports
                              if isinstance(p.get("containerPort"), int)}
    used_names: set[str] = {p["name"] for p in all_ports if isinstance(p.get("name"), str)}
    requested = annotations.get(SIDECAR_PORT_ANNOTATION)
    if requested is not None:
        if not str(requested).isdigit() or not 0 < int(requested) < 65536:
            return skip(f"annotation {SIDECAR_PORT_ANNOTATION}={requested!r} is not a port number")
        sidecar_port = int(requested)
        if sidecar_port in used_numbers:
            return skip(f"annotation {SIDECAR_PORT_ANNOTATION}={requested} is already a container port")
    else:
        sidecar_port = _free_port(settings.sidecar_port, used_numbers)
    admin_port = _free_port(settings.admin_port, used_numbers | {sidecar_port})
    if ADMIN_PORT_NAME in used_names:
        return skip(f"a container already has a port named {ADMIN_PORT_NAME!r}")
    renamed = app_port_name(port_name, used_names | {ADMIN_PORT_NAME})

    patch: list[dict[str, Any]] = []
    if "annotations" in meta and isinstance(meta["annotations"], Mapping):
        patch.append({"op": "add", "path": f"/metadata/annotations/{_esc(INJECTED_ANNOTATION)}",
                      "value": "true"})
    else:
        patch.append({"op": "add", "path": "/metadata/annotations",
                      "value": {INJECTED_ANNOTATION: "true"}})
    patch.append({"op": "replace", "path": f"/spec/containers/{ci}/ports/{pi}/name", "value": renamed})
    if app_port.get("hostPort"):
        warnings.append(f"sluice: port {port_name!r} has hostPort {app_port['hostPort']}: traffic "
                        "to the node's port bypasses the sidecar")

    # Probes and lifecycle hooks that named the port: point them at the app's own number.
    # Named probe ports resolve in the probe's own container, so other containers are only
    # rewritten when they have no port of that name of their own.
    for key, group in (("containers", containers), ("initContainers", init_containers)):
        for idx, c in enumerate(group):
            own = any(isinstance(p, Mapping) and p.get("name") == port_name
                      for p in c.get("ports") or [])
            if own and not (key == "containers" and idx == ci):
                continue
            base = f"/spec/{key}/{idx}"
            for probe_key in _PROBES:
                for handler in ("httpGet", "tcpSocket"):
                    if _get(c, probe_key, handler, "port") == port_name:
                        patch.append({"op": "replace", "path": f"{base}/{probe_key}/{handler}/port",
                                      "value": number})
            for hook in ("postStart", "preStop"):
                for handler in ("httpGet", "tcpSocket"):
                    if _get(c, "lifecycle", hook, handler, "port") == port_name:
                        patch.append({"op": "replace",
                                      "path": f"{base}/lifecycle/{hook}/{handler}/port",
                                      "value": number})

    patch.append({"op": "add", "path": "/spec/containers/-",
                  "value": sidecar_container(settings, port_name, sidecar_port, admin_port, number)})
    volume = {"name": PODINFO_VOLUME, "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
    if isinstance(spec.get("volumes"), list):
        patch.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    if spec.get("hostNetwork"):
        warnings.append(f"sluice: the pod uses hostNetwork: the sidecar listens on the node's ports "
                        f"{sidecar_port} and {admin_port}")
    return patch, warnings


def sidecar_container(settings: InjectionSettings, port_name: str, port: int, admin_port: int,
                      app_port: int) -> dict[str, Any]:
    """The injected container: cluster-mode sidecar in front of ``127.0.0.1:<app_port>``."""
    args = ["sidecar", "--upstream", f"http://127.0.0.1:{app_port}",
            "--listen", f"0.0.0.0:{port}", "--admin-listen", f"0.0.0.0:{admin_port}"]
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if settings.redis_url_secret is not None:
        secret, key = settings.redis_url_secret
        env.append({"name": "SLUICE_REDIS",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    elif settings.redis_url:
        args += ["--redis", settings.redis_url]
    args += ["--namespace", "$(POD_NAMESPACE)", "--pod-labels", f"{PODINFO_MOUNT}/labels",
             "--pod-name", "$(POD_NAME)"]
    tuning = {"SLUICE_REDIS_TIMEOUT_MS": settings.redis_timeout_ms,
              "SLUICE_REDIS_CONNECT_TIMEOUT_MS": settings.redis_connect_timeout_ms,
              "SLUICE_BREAKER_THRESHOLD": settings.breaker_threshold,
              "SLUICE_BREAKER_COOLDOWN_S": settings.breaker_cooldown_s,
              "SLUICE_LOG_LEVEL": settings.log_level,
              **{"SLUICE_" + name.upper(): value for name, value in settings.client_limits.items()}}
    env += [{"name": k, "value": str(v)} for k, v in tuning.items() if v is not None]
    env += [{"name": k, "value": v} for k, v in settings.extra_env.items()]
    security: dict[str, Any] = {
        "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    if settings.run_as_user is not None:
        security["runAsUser"] = settings.run_as_user
        security["runAsGroup"] = settings.run_as_user
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "env": env,
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"},
                  {"name": ADMIN_PORT_NAME, "containerPort": admin_port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
                           "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME},
                          "periodSeconds": 10, "failureThreshold": 3},
        "resources": copy.deepcopy(dict(settings.resources)),
        "securityContext": security,
        "volumeMounts": [{"name": PODINFO_VOLUME, "mountPath": PODINFO_MOUNT, "readOnly": True}],
    }
