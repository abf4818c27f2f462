"""The operator flags that shape the injected sidecar (operator/sluice_operator/injection/settings.py):
argv (or ``SLUICE_OPERATOR_*`` env vars) -> the real ``sluice operator`` parser ->
:class:`InjectionSettings` -> the container the mutating webhook injects. Every bad value stops
the operator with ``sluice operator: --flag: reason``. No cluster, no Redis."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from typing import Any

import kubernetes_validate
import pytest
from sluice_core import settingsform
from sluice_core.sidecar_settings import SidecarSettings
from sluice_operator import cli as operator_cli
from sluice_operator.injection import settings as injection
from sluice_operator.injection import values
from sluice_operator.injection.container import sidecar_container
from sluice_operator.injection.names import ADMIN_PORT_NAME, PODINFO_MOUNT, SIDECAR_NAME
from sluice_operator.injection.settings import InjectionSettings
from sluice_operator.pod_admission import mutate_pod
from support.examples import k8s_version
from support.jsonpatch import apply_patch
from support.paths import ROOT

REDIS = "redis://redis.sluice-system:6379"
ENV_OF = {f.name: f.env for f in settingsform.flags(InjectionSettings)}
"""The environment variable of each injector flag (``--sidecar-port`` -> ``SLUICE_OPERATOR_SIDECAR_PORT``)."""

FULL_ARGV = [
    "--sidecar-image", "registry.example/sluice:1.2.3",
    "--sidecar-image-pull-policy", "Always",
    "--sidecar-resources", '{"requests": {"cpu": "100m", "memory": "96Mi"}, '
                           '"limits": {"cpu": "1", "memory": "0.25Gi"}}',
    "--sidecar-redis-timeout-ms", "20",
    "--sidecar-redis-connect-timeout-ms", "250",
    "--sidecar-breaker-threshold", "3",
    "--sidecar-breaker-cooldown-s", "0.5",
    "--sidecar-log-level", "DEBUG",
    "--sidecar-grant-cache-size", "5000",
    "--sidecar-grant-cache-max-age-s", "0.25",
    "--sidecar-max-key-resolves", "16",
    "--sidecar-usage", "off",
    "--sidecar-usage-window-s", "5",
    "--sidecar-usage-max-clients", "2000",
    "--sidecar-usage-max-endpoints", "50",
    "--sidecar-usage-stream-maxlen", "5000",
    "--sidecar-usage-retries", "3",
    "--sidecar-max-request-header-bytes", "32768",
    "--sidecar-max-headers", "50",
    "--sidecar-header-timeout-s", "2.5",
    "--sidecar-keepalive-timeout-s", "30",
    "--sidecar-client-timeout-s", "20",
    "--sidecar-max-connections", "4096",
    "--sidecar-max-connections-per-client", "128",
    "--sidecar-max-inflight-requests", "64",
    "--sidecar-port", "16080",
    "--sidecar-admin-port", "16090",
    "--sidecar-default-port-name", "web",
    "--sidecar-run-as-user", "1001",
    "--sidecar-env", "SLUICE_UPSTREAM_TIMEOUT_S=30",
    "--sidecar-env", "HTTP_PROXY=http://proxy:3128,with=commas",
]


@pytest.fixture(autouse=True)
def _no_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the env vars they mean; none leak in from the outside."""
    for name in list(os.environ):
        if name.startswith("SLUICE_OPERATOR_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> argparse.Namespace:
    """The real ``sluice operator`` parser (env vars are read now, as at start-up)."""
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    return parser.parse_args(["--redis", REDIS, *argv])


def settings(*argv: str) -> InjectionSettings:
    return operator_cli.settings_from_args(parse(*argv)).injection


def refusal(*argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        settings(*argv)
    return str(info.value.code)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def app_pod(port_name: str = "http") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "shop",
                         "labels": {"app": "shop", "sluice.dev/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "app:1",
                                     "ports": [{"name": port_name, "containerPort": 8000}]}]}}


def injected(pod: dict[str, Any], s: InjectionSettings) -> dict[str, Any]:
    """The pod after the mutating webhook's JSONPatch (the real webhook function)."""
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "u1", "operation": "CREATE", "namespace": "shop", "object": pod}}
    response = mutate_pod(review, s)["response"]
    assert response["allowed"] and "patch" in response, response
    return dict(apply_patch(pod, json.loads(base64.b64decode(response["patch"]))))


# ---------------------------------------------------------------------------------------------
# from flags to the injected container


def test_no_flags_give_the_injection_settings_defaults() -> None:
    assert settings() == replace(InjectionSettings(), redis_url=REDIS)


def test_every_flag_reaches_the_injected_container() -> None:
    s = settings(*FULL_ARGV)
    assert s.image == "registry.example/sluice:1.2.3"
    assert s.log_level == "debug"  # folded to the sidecar's spelling
    pod = injected(app_pod("web"), s)  # --sidecar-default-port-name web
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME]
    assert c["image"] == "registry.example/sluice:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "96Mi"},
                              "limits": {"cpu": "1", "memory": "0.25Gi"}}
    env = env_of(c)
    assert {k: env[k] for k in ("SLUICE_REDIS_TIMEOUT_MS", "SLUICE_REDIS_CONNECT_TIMEOUT_MS",
                                "SLUICE_BREAKER_THRESHOLD", "SLUICE_BREAKER_COOLDOWN_S",
                                "SLUICE_LOG_LEVEL", "SLUICE_GRANT_CACHE_SIZE",
                                "SLUICE_GRANT_CACHE_MAX_AGE_S", "SLUICE_MAX_KEY_RESOLVES")} == {
        "SLUICE_REDIS_TIMEOUT_MS": "20", "SLUICE_REDIS_CONNECT_TIMEOUT_MS": "250",
        "SLUICE_BREAKER_THRESHOLD": "3", "SLUICE_BREAKER_COOLDOWN_S": "0.5",
        "SLUICE_LOG_LEVEL": "debug", "SLUICE_GRANT_CACHE_SIZE": "5000",
        "SLUICE_GRANT_CACHE_MAX_AGE_S": "0.25", "SLUICE_MAX_KEY_RESOLVES": "16"}
    assert {k: env[k] for k in env if k.startswith(("SLUICE_MAX_", "SLUICE_HEADER_", "SLUICE_KEEPALIVE_",
                                                    "SLUICE_CLIENT_"))
            and k != "SLUICE_MAX_KEY_RESOLVES"  # a tuned one, above
            } == {"SLUICE_MAX_REQUEST_HEADER_BYTES": "32768", "SLUICE_MAX_HEADERS": "50",
                  "SLUICE_HEADER_TIMEOUT_S": "2.5", "SLUICE_KEEPALIVE_TIMEOUT_S": "30.0",
                  "SLUICE_CLIENT_TIMEOUT_S": "20.0",
                  "SLUICE_MAX_CONNECTIONS": "4096", "SLUICE_MAX_CONNECTIONS_PER_CLIENT": "128",
                  "SLUICE_MAX_INFLIGHT_REQUESTS": "64"}
    assert env["SLUICE_UPSTREAM_TIMEOUT_S"] == "30"
    assert env["HTTP_PROXY"] == "http://proxy:3128,with=commas"  # only the first '=' splits
    assert c["ports"] == [{"name": "web", "containerPort": 16080, "protocol": "TCP"},
                          {"name": ADMIN_PORT_NAME, "containerPort": 16090, "protocol": "TCP"}]
    assert "--listen" in c["args"] and "0.0.0.0:16080" in c["args"]
    assert "0.0.0.0:16090" in c["args"]
    assert c["securityContext"]["runAsUser"] == c["securityContext"]["runAsGroup"] == 1001
    assert c["securityContext"]["runAsNonRoot"] is True
    app = pod["spec"]["containers"][0]
    assert app["ports"][0]["name"] == "web-app"  # the sidecar took the port over
    # and the API server's schema takes the pod as it is
    kubernetes_validate.validate(pod, k8s_version(), strict=True)


def test_run_as_user_image_leaves_the_user_to_the_image() -> None:
    c = sidecar_container(settings("--sidecar-run-as-user", "image"), "http", 15080, 15090, 8000)
    assert "runAsUser" not in c["securityContext"] and "runAsGroup" not in c["securityContext"]
    assert c["securityContext"]["runAsNonRoot"] is True


def test_empty_resources_object_means_none() -> None:
    s = settings("--sidecar-resources", "{}")
    assert sidecar_container(s, "http", 15080, 15090, 8000)["resources"] == {}
    s = settings("--sidecar-resources", '{"requests": {"memory": "64Mi"}, "limits": {}}')
    assert s.resources == {"requests": {"memory": "64Mi"}}  # no empty maps in the pod spec


def test_sidecar_defaults_left_unset_pass_no_env_var() -> None:
    """Unset tuning flags leave the sidecar's own defaults: no env var at all."""
    env = env_of(sidecar_container(settings(), "http", 15080, 15090, 8000))
    assert env["SLUICE_REDIS_TIMEOUT_MS"] == "50"
    for name in ("SLUICE_REDIS_CONNECT_TIMEOUT_MS", "SLUICE_BREAKER_THRESHOLD",
                 "SLUICE_BREAKER_COOLDOWN_S", "SLUICE_LOG_LEVEL", "SLUICE_MAX_CONNECTIONS",
                 "SLUICE_MAX_CONNECTIONS_PER_CLIENT",
                 "SLUICE_MAX_INFLIGHT_REQUESTS", "SLUICE_MAX_REQUEST_HEADER_BYTES",
                 "SLUICE_MAX_HEADERS", "SLUICE_HEADER_TIMEOUT_S", "SLUICE_KEEPALIVE_TIMEOUT_S",
                 "SLUICE_CLIENT_TIMEOUT_S", "SLUICE_GRANT_CACHE_SIZE", "SLUICE_GRANT_CACHE_MAX_AGE_S",
                 "SLUICE_MAX_KEY_RESOLVES"):
        assert name not in env


# ---------------------------------------------------------------------------------------------
# environment variables


def flag_env_pairs() -> list[tuple[str, str]]:
    """(--flag, value) of FULL_ARGV, --sidecar-env excepted (a list of its own)."""
    pairs = list(zip(FULL_ARGV[::2], FULL_ARGV[1::2], strict=True))
    return [(f, v) for f, v in pairs if f != "--sidecar-env"]


def test_every_flag_falls_back_to_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag, value in flag_env_pairs():
        monkeypatch.setenv(ENV_OF[flag], value)
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_ENV",
                       "SLUICE_UPSTREAM_TIMEOUT_S=30\n\nHTTP_PROXY=http://proxy:3128,with=commas\n")
    assert settings() == settings(*FULL_ARGV)


def test_the_command_line_wins_over_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_PORT", "17000")
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_ENV", "A=1\nB=2")
    s = settings("--sidecar-port", "18000", "--sidecar-env", "C=3")
    assert s.sidecar_port == 18000
    assert s.extra_env == {"C": "3"}  # the flags replace the env var's list
    assert settings().extra_env == {"A": "1", "B": "2"}


def test_an_empty_value_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag, _ in flag_env_pairs():
        monkeypatch.setenv(ENV_OF[flag], "")
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_ENV", "")
    assert settings() == replace(InjectionSettings(), redis_url=REDIS)


def test_an_env_var_with_a_bad_value_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_BREAKER_THRESHOLD", "many")
    assert refusal() == ("sluice operator: --sidecar-breaker-threshold: expected a positive "
                         "integer, got 'many'")
    monkeypatch.delenv("SLUICE_OPERATOR_SIDECAR_BREAKER_THRESHOLD")
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_ENV", "OK=1\nSLUICE_LISTEN=0.0.0.0:1")
    assert refusal() == ("sluice operator: --sidecar-env: SLUICE_LISTEN cannot be set here: "
                         "use --sidecar-port")


def test_redis_flags_moved_with_their_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings("--sidecar-redis", "redis://other:6379").redis_url == "redis://other:6379"
    s = settings("--sidecar-redis-secret", "sluice-redis/url")
    assert s.redis_url_secret == ("sluice-redis", "url")
    env = env_of(sidecar_container(s, "http", 15080, 15090, 8000))
    assert env["SLUICE_REDIS"] == {"secretKeyRef": {"name": "sluice-redis", "key": "url"}}
    monkeypatch.setenv("SLUICE_OPERATOR_SIDECAR_REDIS_SECRET", "s/k")
    assert settings().redis_url_secret == ("s", "k")


# ---------------------------------------------------------------------------------------------
# bad values: SystemExit naming the flag and the reason


@pytest.mark.parametrize(("argv", "flag", "reason"), [
    (["--sidecar-image-pull-policy", "Sometimes"], "--sidecar-image-pull-policy",
     "expected one of Always, IfNotPresent, Never, got 'Sometimes'"),
    (["--sidecar-resources", "{cpu: 1}"], "--sidecar-resources", "not valid JSON"),
    (["--sidecar-resources", '["requests"]'], "--sidecar-resources", "expected a JSON object"),
    (["--sidecar-resources", '{"claims": []}'], "--sidecar-resources",
     "unknown key 'claims' (only requests and limits)"),
    (["--sidecar-resources", '{"requests": "100m"}'], "--sidecar-resources",
     "requests: expected an object of resource name -> quantity"),
    (["--sidecar-resources", '{"requests": {"cpu": 1}}'], "--sidecar-resources",
     'requests.cpu: expected a quantity string such as "100m" or "64Mi", got 1'),
    (["--sidecar-resources", '{"limits": {"memory": "128MB"}}'], "--sidecar-resources",
     "limits.memory: '128MB' is not a Kubernetes quantity"),
    (["--sidecar-resources", '{"limits": {"memory": "-1Mi"}}'], "--sidecar-resources",
     "limits.memory: must not be negative"),
    (["--sidecar-resources", '{"limits": {"c p u": "1"}}'], "--sidecar-resources",
     "limits: 'c p u' is not a resource name"),
    (["--sidecar-resources", '{"requests": {"memory": "256Mi"}, "limits": {"memory": "0.25Gi"}}'],
     None, None),  # equal is fine
    (["--sidecar-resources", '{"requests": {"memory": "257Mi"}, "limits": {"memory": "0.25Gi"}}'],
     "--sidecar-resources", "requests.memory (257Mi) is above limits.memory (0.25Gi)"),
    (["--sidecar-redis-timeout-ms", "0"], "--sidecar-redis-timeout-ms", "must be greater than 0, got 0"),
    (["--sidecar-redis-timeout-ms", "1.5"], "--sidecar-redis-timeout-ms",
     "expected a positive integer, got '1.5'"),
    (["--sidecar-redis-connect-timeout-ms", "-5"], "--sidecar-redis-connect-timeout-ms",
     "must be greater than 0, got -5"),
    (["--sidecar-breaker-threshold", "0"], "--sidecar-breaker-threshold", "must be greater than 0"),
    (["--sidecar-breaker-cooldown-s", "0"], "--sidecar-breaker-cooldown-s", "must be greater than 0"),
    (["--sidecar-breaker-cooldown-s", "nan"], "--sidecar-breaker-cooldown-s", "must be greater than 0"),
    (["--sidecar-breaker-cooldown-s", "soon"], "--sidecar-breaker-cooldown-s",
     "expected a positive number, got 'soon'"),
    (["--sidecar-grant-cache-size", "0"], "--sidecar-grant-cache-size", "must be greater than 0"),
    (["--sidecar-grant-cache-max-age-s", "0"], "--sidecar-grant-cache-max-age-s",
     "must be greater than 0"),
    (["--sidecar-max-key-resolves", "1.5"], "--sidecar-max-key-resolves",
     "expected a positive integer, got '1.5'"),
    (["--sidecar-usage", "maybe"], "--sidecar-usage", "expected one of on, off, got 'maybe'"),
    (["--sidecar-usage-window-s", "0"], "--sidecar-usage-window-s", "must be greater than 0"),
    (["--sidecar-env", "SLUICE_USAGE_RETRIES=5"], "--sidecar-env",
     "SLUICE_USAGE_RETRIES cannot be set here: use --sidecar-usage-retries"),
    (["--sidecar-env", "SLUICE_GRANT_CACHE_SIZE=5"], "--sidecar-env",
     "SLUICE_GRANT_CACHE_SIZE cannot be set here: use --sidecar-grant-cache-size"),
    (["--sidecar-max-connections", "0"], "--sidecar-max-connections", "must be greater than 0"),
    (["--sidecar-max-request-header-bytes", "16k"], "--sidecar-max-request-header-bytes",
     "expected a positive integer, got '16k'"),
    (["--sidecar-header-timeout-s", "-1"], "--sidecar-header-timeout-s", "must be greater than 0"),
    (["--sidecar-env", "SLUICE_MAX_CONNECTIONS=5"], "--sidecar-env",
     "SLUICE_MAX_CONNECTIONS cannot be set here: use --sidecar-max-connections"),
    (["--sidecar-log-level", "trace"], "--sidecar-log-level",
     "expected one of debug, info, warning, error, got 'trace'"),
    (["--sidecar-port", "0"], "--sidecar-port", "expected a port number 1..65535, got '0'"),
    (["--sidecar-port", "65536"], "--sidecar-port", "expected a port number 1..65535"),
    (["--sidecar-admin-port", "http"], "--sidecar-admin-port", "expected a port number 1..65535"),
    (["--sidecar-port", "15090"], "--sidecar-admin-port", "must differ from --sidecar-port (15090)"),
    (["--sidecar-default-port-name", "HTTP"], "--sidecar-default-port-name", "is not a port name"),
    (["--sidecar-default-port-name", "a-very-long-port-name"], "--sidecar-default-port-name",
     "is not a port name"),
    (["--sidecar-default-port-name", "8080"], "--sidecar-default-port-name", "is not a port name"),
    (["--sidecar-run-as-user", "0"], "--sidecar-run-as-user", "0 is root"),
    (["--sidecar-run-as-user", "nobody"], "--sidecar-run-as-user",
     "expected a user id or 'image', got 'nobody'"),
    (["--sidecar-run-as-user", "-1"], "--sidecar-run-as-user", "expected a user id"),
    (["--sidecar-env", "NOEQUALS"], "--sidecar-env", "expected NAME=VALUE, got 'NOEQUALS'"),
    (["--sidecar-env", "1X=a"], "--sidecar-env", "'1X' is not an environment variable name"),
    (["--sidecar-env", "A-B=a"], "--sidecar-env", "'A-B' is not an environment variable name"),
    (["--sidecar-env", "A=1", "--sidecar-env", "A=2"], "--sidecar-env", "A is given twice"),
    (["--sidecar-redis-secret", "no-key"], "--sidecar-redis-secret",
     "expected NAME/KEY, got 'no-key'"),
    (["--sidecar-redis-secret", "redis/a/b"], "--sidecar-redis-secret", "'a/b' is not a Secret key"),
    (["--sidecar-redis-secret", "Redis_URL/url"], "--sidecar-redis-secret",
     "'Redis_URL' is not a Secret name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_values_name_the_flag_and_the_reason(argv: list[str], flag: str | None,
                                                 reason: str | None) -> None:
    if flag is None:
        settings(*argv)
        return
    message = refusal(*argv)
    assert message.startswith(f"sluice operator: {flag}: "), message
    assert reason is not None and reason in message, message


@pytest.mark.parametrize("name", sorted(injection.RESERVED_ENV))
def test_env_vars_the_injector_sets_are_refused(name: str) -> None:
    message = refusal("--sidecar-env", f"{name}=x")
    assert message.startswith(f"sluice operator: --sidecar-env: {name} cannot be set here: ")
    hint = injection.RESERVED_ENV[name]
    assert hint.startswith(("use --sidecar-", "it is set by the injector",
                            "an injected sidecar runs in cluster mode")), hint


def test_the_refused_names_are_exactly_what_the_injector_sets() -> None:
    """Every env var the injected container gets from the settings is refused in --sidecar-env,
    and nothing else is."""
    full = replace(settings(*FULL_ARGV), extra_env={}, redis_url_secret=("s", "k"), redis_ca_file="/ca.crt")
    env = set(env_of(sidecar_container(full, "http", 15080, 15090, 8000, drain_token="t")))
    # wiring passed as arguments: their SLUICE_* env var would be a second, conflicting source
    args = {"SLUICE_UPSTREAM", "SLUICE_LISTEN", "SLUICE_ADMIN_LISTEN", "SLUICE_NAMESPACE",
            "SLUICE_POD_LABELS", "SLUICE_POD_NAME", "SLUICE_REDIS"}
    # standalone mode's files: the sidecar refuses them together with --namespace
    standalone = {"SLUICE_POLICY_FILE", "SLUICE_API_KEYS_FILE"}
    assert set(injection.RESERVED_ENV) == env | args | standalone


def test_the_variables_written_into_the_pod_are_the_sidecar_schemas() -> None:
    """The injector's tuning variables are named by the sidecar's schema in the core (what
    ``sluice sidecar`` reads), and InjectionSettings.sidecar_env() gives what the container gets."""
    from sluice_core.settingsform import flags

    s = settings(*FULL_ARGV)
    sidecar_envs = {f.env for f in flags(SidecarSettings)}
    env = env_of(sidecar_container(s, "http", 15080, 15090, 8000))
    tuning = {k: v for k, v in env.items() if k in sidecar_envs and k not in {
        "SLUICE_UPSTREAM_TIMEOUT_S", "SLUICE_REDIS",  # the --sidecar-env entry; the Secret's URL
        "SLUICE_WITHOUT_CONFIG"}}  # per pod (injection.failmode), not a setting
    assert s.sidecar_env() == tuning
    assert set(s.sidecar_env()) <= sidecar_envs
    assert len(s.sidecar_env()) == len(injection.TUNED) + len(injection.CLIENT_LIMITS)
    assert settings().sidecar_env() == {"SLUICE_REDIS_TIMEOUT_MS": "50"}  # the others: the sidecar's


def test_quantities() -> None:
    q = values.quantity
    assert q("50m") == Decimal("0.05")
    assert q("64Mi") == 64 * 2**20
    assert q("1e3") == 1000 == q("1k")
    assert q(".5") == Decimal("0.5") == q("500m")
    assert q("1.5G") == Decimal("1.5e9")
    assert q("2E") == 2 * 10**18 and q("2Ei") == 2 * 2**60
    for bad in ("", "1x", "1mi", "1KB", "e3", "1.5e", "1 Mi", "Mi"):
        with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
            q(bad)


# ---------------------------------------------------------------------------------------------
# help text, and the real command


def test_every_flag_says_its_env_var_and_its_default() -> None:
    parser = argparse.ArgumentParser()
    settingsform.add_arguments(parser, InjectionSettings)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == 33
    for action in flags:
        (flag,) = action.option_strings
        assert flag.startswith("--sidecar-")
        assert f"[env {ENV_OF[flag]}" in (action.help or ""), flag
        assert "(default: " in (action.help or ""), flag


def test_the_sidecar_defaults_quoted_in_the_help_are_the_sidecars() -> None:
    """Help and README quote the sidecar's own defaults for the flags left unset."""
    sidecar = SidecarSettings(upstream="http://127.0.0.1:1")
    parser = argparse.ArgumentParser()
    settingsform.add_arguments(parser, InjectionSettings)
    helps = {a.option_strings[0]: a.help or "" for a in parser._actions if a.option_strings}
    for flag, value in (("--sidecar-redis-connect-timeout-ms", sidecar.redis_connect_timeout_ms),
                        ("--sidecar-breaker-threshold", sidecar.breaker_threshold),
                        ("--sidecar-breaker-cooldown-s", sidecar.breaker_cooldown_s),
                        ("--sidecar-log-level", sidecar.log_level),
                        ("--sidecar-grant-cache-size", sidecar.grant_cache_size),
                        ("--sidecar-grant-cache-max-age-s", sidecar.grant_cache_max_age_s),
                        ("--sidecar-max-key-resolves", sidecar.max_key_resolves),
                        *((f"--sidecar-{name.replace('_', '-')}", getattr(sidecar, name))
                          for name in injection.CLIENT_LIMITS)):
        assert f"(default: the sidecar's, {value})" in helps[flag], flag
    assert InjectionSettings().redis_timeout_ms == sidecar.redis_timeout_ms


def test_sluice_operator_exits_with_the_message_before_starting() -> None:
    """The real command: a bad flag stops it at once, with the message on stderr, exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_OPERATOR_")}
    res = subprocess.run(
        [sys.executable, "-m", "sluice_core.cli", "operator", "--redis", "redis://127.0.0.1:1",
         "--sidecar-resources", '{"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}'],
        capture_output=True, text=True, timeout=60, env=env, check=False,
        stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res
    assert res.stderr.strip().endswith(
        "sluice operator: --sidecar-resources: requests.cpu (2) is above limits.cpu (1): the "
        "API server would refuse every injected pod"), res.stderr


@pytest.mark.parametrize(("argv", "refused"), [
    (["--cluster-policies", "on", "--namespace", "team-*"], True),
    (["--cluster-policies", "on", "--namespace", "team-*", "--namespace", "sluice-*"], False),
    (["--cluster-policies", "on"], False),  # the whole cluster
    (["--cluster-policies", "auto", "--namespace", "team-*"], False),  # then none served
])
def test_cluster_keys_must_be_in_a_watched_namespace(argv: list[str], refused: bool) -> None:
    args = parse(*argv)
    if refused:
        with pytest.raises(SystemExit, match="--cluster-keys-namespace: sluice-system is not among"):
            operator_cli.settings_from_args(args)
    else:
        operator_cli.settings_from_args(args)


def test_every_description_of_the_cooldown_gives_the_breakers_probe_periods() -> None:
    """The sidecar's help, the operator's, the chart's values, schema and README all say how
    often the open breaker probes, as breaker.py does: every PROBE_INTERVAL_S while Redis is
    unreachable or slow, once per cooldown while it answers with an error."""
    from sluice_sidecar.breaker import PROBE_INTERVAL_S

    said = (f"then every {PROBE_INTERVAL_S} s while Redis is unreachable or slow, once per cooldown "
            "while it answers with an error (a wrong password)")
    parser = argparse.ArgumentParser()
    settingsform.add_arguments(parser, InjectionSettings)
    helps = {a.option_strings[0]: a.help or "" for a in parser._actions if a.option_strings}
    root = ROOT
    values = (root / "charts/sluice/values.yaml").read_text()
    values_comment = " ".join(line.strip().lstrip("#").strip() for line in values.splitlines()
                              if line.strip().startswith("#"))
    texts = {
        "--breaker-cooldown-s help": next(f.doc.help for f in settingsform.flags(SidecarSettings)
                                          if f.field == "breaker_cooldown_s"),
        "--sidecar-breaker-cooldown-s help": helps["--sidecar-breaker-cooldown-s"],
        "values.yaml": values_comment,
        "values.schema.json": (root / "charts/sluice/values.schema.json").read_text(),
        "charts/sluice/README.md": (root / "charts/sluice/README.md").read_text(),
        "README.md": (root / "README.md").read_text(),
    }
    for where, text in texts.items():
        assert said in " ".join(text.split()), where


# ---------------------------------------------------------------------------------------------
# the operator's own flags: the same form (env var fallback, checked like a flag)


def operator_refusal(*argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        operator_cli.settings_from_args(parse(*argv))
    return str(info.value.code)


def test_the_operators_flags_read_their_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_OPERATOR_RESYNC_INTERVAL_S", "7.5")
    monkeypatch.setenv("SLUICE_OPERATOR_WATCH_NAMESPACES", "team-a\nteam-b\n")
    monkeypatch.setenv("SLUICE_OPERATOR_CLUSTER_POLICIES", "off")
    monkeypatch.setenv("SLUICE_OPERATOR_WEBHOOK_SERVICE", "ops/sluice-webhook:8443")
    s = operator_cli.settings_from_args(parse())
    assert (s.resync_interval_s, s.namespaces, s.cluster_policies) == (7.5, ("team-a", "team-b"), False)
    assert s.webhook_endpoint is not None and s.webhook_endpoint.service_port == 8443
    assert "sluice-webhook.ops.svc" in s.webhook_dns_names
    s = operator_cli.settings_from_args(parse("--namespace", "shop", "--resync-interval-s", "2"))
    assert (s.namespaces, s.resync_interval_s) == (("shop",), 2.0)  # the command line wins


@pytest.mark.parametrize(("env", "value", "message"), [
    ("SLUICE_OPERATOR_RESYNC_INTERVAL_S", "soon",
     "sluice operator: --resync-interval-s: expected a positive number, got 'soon'"),
    ("SLUICE_OPERATOR_RESYNC_INTERVAL_S", "0", "sluice operator: --resync-interval-s: must be greater than 0, got 0.0"),
    ("SLUICE_OPERATOR_PEERING_LIFETIME_S", "0", "sluice operator: --peering-lifetime-s: must be greater than 0, got 0"),
    ("SLUICE_OPERATOR_LOG_LEVEL", "loud",
     "sluice operator: --log-level: expected one of debug, info, warning, error, critical, got 'loud'"),
    ("SLUICE_OPERATOR_CLUSTER_POLICIES", "sometimes",
     "sluice operator: --cluster-policies: expected one of auto, on, off, got 'sometimes'"),
    ("SLUICE_OPERATOR_WEBHOOK_CERT_SECRET", "no-namespace",
     "sluice operator: --webhook-cert-secret: expected NAMESPACE/NAME, got 'no-namespace'"),
    ("SLUICE_OPERATOR_METRICS_LISTEN", "9091", "sluice operator: --metrics-listen: expected HOST:PORT, got '9091'"),
    ("SLUICE_OPERATOR_WEBHOOK_LISTEN", "0.0.0.0:https",
     "sluice operator: --webhook-listen: expected HOST:PORT, got '0.0.0.0:https'"),
    ("SLUICE_OPERATOR_WEBHOOK_SERVICE", "sluice-webhook",
     "sluice operator: --webhook-service: expected NAMESPACE/NAME[:PORT], got 'sluice-webhook'"),
    ("SLUICE_OPERATOR_WEBHOOK_SERVICE", "ops/sluice-webhook:https",
     "sluice operator: --webhook-service: expected a port number 1..65535, got 'https'"),
], ids=["resync-not-a-number", "resync-zero", "lifetime-zero", "log-level", "cluster-policies", "cert-secret",
        "metrics-listen", "webhook-listen", "webhook-service", "webhook-service-port"])
def test_an_operator_value_is_checked_alike_from_a_flag_or_its_env_var(
        env: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = "--" + env.removeprefix("SLUICE_OPERATOR_").lower().replace("_", "-")
    assert operator_refusal(flag, value) == message
    monkeypatch.setenv(env, value)
    assert operator_refusal() == message


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical", "CRITICAL", "Warning"])
def test_the_operator_takes_every_log_level_the_chart_allows(level: str) -> None:
    """The chart's ``operator.logLevel`` allows ``critical`` (the old operator handed any name
    to ``logging``); any case, stored as the lower-case name."""
    assert operator_cli.settings_from_args(parse("--log-level", level)).log_level == level.lower()


@pytest.mark.parametrize("where", ["flag", "env"])
def test_an_empty_redis_url_is_refused_in_one_line(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--redis`` is required: empty (a Secret's empty key in the chart) is a bad URL, refused as
    any bad one, not a TypeError."""
    if where == "env":
        monkeypatch.setenv("SLUICE_OPERATOR_REDIS", "")
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)  # reads the variables now
    with pytest.raises(SystemExit) as info:
        operator_cli.settings_from_args(parser.parse_args(["--redis", ""] if where == "flag" else []))
    assert str(info.value.code) == ("sluice operator: --redis: redis URL scheme must be redis, rediss, "
                                    "redis+sentinel or redis+cluster, got another")


def test_the_operators_own_namespace_variable_does_not_narrow_the_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``<APP>_NAMESPACE`` is the usual downward-API name of one's own namespace: setting it must
    not restrict the watch (that is ``SLUICE_OPERATOR_WATCH_NAMESPACES``)."""
    monkeypatch.setenv("SLUICE_OPERATOR_NAMESPACE", "sluice-system")
    assert operator_cli.settings_from_args(parse()).namespaces == ()


@pytest.mark.parametrize("secret", [False, True], ids=["redis-url", "redis-secret"])
def test_the_injected_args_are_flags_the_sidecar_takes(secret: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The injected container's args, with the downward-API values the kubelet substitutes,
    read by the sidecar's own parser and settings: cluster mode, every value where it belongs."""
    from sluice_sidecar import cli as sidecar_cli
    from sluice_sidecar.settings import from_args

    argv = ("--sidecar-redis-secret", "sluice-redis/url") if secret else ()
    c = sidecar_container(settings(*argv), "http", 15081, 15091, 8000)
    assert c["args"][0] == "sidecar"
    kubelet = {"$(POD_NAMESPACE)": "shop", "$(POD_NAME)": "app-7d9f"}
    args = [kubelet.get(a, a) for a in c["args"][1:]]
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    if secret:  # the kubelet fills it from the Secret
        monkeypatch.setenv(injection.SIDECAR_REDIS_ENV, "redis://from-the-secret:6379")
    parser = argparse.ArgumentParser(allow_abbrev=False)  # a renamed flag must not pass as a prefix
    sidecar_cli.add_arguments(parser)
    s = from_args(parser.parse_args(args))
    assert (s.upstream, s.listen, s.admin_listen) == ("http://127.0.0.1:8000", "0.0.0.0:15081", "0.0.0.0:15091")
    assert (s.namespace, s.pod_name) == ("shop", "app-7d9f")
    assert s.pod_labels == f"{PODINFO_MOUNT}/labels"
    assert s.redis == ("redis://from-the-secret:6379" if secret else REDIS)
    assert s.policy_file is None
