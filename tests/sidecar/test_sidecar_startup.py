"""Fail-safe start-up: a sidecar that has never loaded a config does not serve unlimited unless a
flag says so, and whatever stops it from starting is one line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from sluice_core import configdoc, configstore
from sluice_core.parse import parse_policy
from support.polling import wait_for
from support.redis_servers import pick_port
from support.sidecar_harness import Upstream, policy_doc, start_sidecar, write_file


def run_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    """``sluice sidecar`` as a real process on loopback; it must exit by itself (the timeout is
    only a bound: a sidecar that starts instead would run until it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    cmd = [sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", "http://127.0.0.1:1",
           "--admin-listen", f"127.0.0.1:{pick_port()}", *args]
    if "--listen" not in args:
        cmd += ["--listen", f"127.0.0.1:{pick_port()}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env, check=False,
                          stdin=subprocess.DEVNULL)


def assert_one_line(res: subprocess.CompletedProcess[str], code: int, starts: str, *needles: str) -> None:
    assert res.returncode == code, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("sluice sidecar: " + starts), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port some other process already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def good_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    write_file(path, policy_doc())
    return path


def test_missing_policy_file_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    res = run_sidecar("--policy-file", str(missing))
    assert_one_line(res, 1, "--policy-file: ", str(missing), "No such file")


def test_invalid_policy_file_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    write_file(bad, policy_doc(tiers=[{"name": "free", "requests": -5, "period": "1m"},
                                      {"name": "pro", "requests": 0, "period": "1m"}]))
    res = run_sidecar("--policy-file", str(bad))
    # every error, on the one line
    assert_one_line(res, 1, "--policy-file: ", "spec.tiers[0].requests", "spec.tiers[1].requests")


def test_unreadable_api_keys_file_refuses_to_start(tmp_path: Path, good_policy: Path) -> None:
    res = run_sidecar("--policy-file", str(good_policy), "--api-keys-file", str(tmp_path / "keys.yaml"))
    assert_one_line(res, 1, "--api-keys-file: ", "keys.yaml", "cannot be read")


def test_port_in_use_is_one_line(listening: int, good_policy: Path) -> None:
    res = run_sidecar("--policy-file", str(good_policy), "--listen", f"127.0.0.1:{listening}")
    assert_one_line(res, 1, f"--listen 127.0.0.1:{listening}: ", "address already in use")


def test_admin_port_in_use_is_one_line(listening: int, good_policy: Path) -> None:
    res = run_sidecar("--policy-file", str(good_policy), "--admin-listen", f"127.0.0.1:{listening}")
    assert_one_line(res, 1, f"--admin-listen 127.0.0.1:{listening}: ", "address already in use")


@pytest.mark.parametrize(("args", "code", "starts", "needle"), [
    (("--listen", "8080"), 2, "--listen must be HOST:PORT", "'8080'"),
    (("--listen", "192.0.2.1:8080"), 1, "--listen 192.0.2.1:8080: ", "assign requested address"),
    (("--redis", "redis://user:s3cret@127.0.0.1:notaport"), 1, "--redis: ", "port of host #1 is not a number"),
    (("--without-config", "sometimes"), 2, "--without-config must be refuse or unlimited", "'sometimes'"),
    (("--breaker-cooldown-s", "0"), 2, "--breaker-cooldown-s must be greater than 0", "got 0.0"),
    (("--breaker-cooldown-s", "-1"), 2, "--breaker-cooldown-s must be greater than 0", "got -1.0"),
    (("--redis-timeout-ms", "0"), 2, "--redis-timeout-ms must be greater than 0", "got 0"),
    (("--redis-connect-timeout-ms", "-5"), 2, "--redis-connect-timeout-ms must be greater than 0", "got -5"),
    (("--upstream-timeout-s", "0"), 2, "--upstream-timeout-s must be greater than 0", "got 0.0"),
    (("--upstream-connect-timeout-s", "nan"), 2, "--upstream-connect-timeout-s must be greater than 0",
     "got nan"),
    (("--breaker-cooldown-s", "inf"), 2, "--breaker-cooldown-s must be greater than 0 and finite", "got inf"),
    (("--upstream-max-connections", "0"), 2, "--upstream-max-connections must be greater than 0", "got 0"),
    (("--log-level", "loud"), 2, "--log-level must be debug or info or warning or error", "'loud'"),
], ids=["listen-not-hostport", "listen-bad-address", "redis-url", "without-config-value",
        "cooldown-zero", "cooldown-negative", "redis-timeout-zero", "redis-connect-timeout-negative",
        "upstream-timeout-zero", "upstream-connect-timeout-nan", "cooldown-inf",
        "upstream-max-connections-zero", "log-level"])
def test_bad_flags_are_one_line(args: tuple[str, ...], code: int, starts: str, needle: str,
                                good_policy: Path) -> None:
    res = run_sidecar("--policy-file", str(good_policy), *args)
    assert_one_line(res, code, starts, needle)
    assert "s3cret" not in res.stderr


def test_a_bad_value_from_the_environment_is_checked_as_a_flag(good_policy: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_WITHOUT_CONFIG"] = "sometimes"  # argparse checks no choices of a default
    res = subprocess.run([sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", "http://127.0.0.1:1",
                          "--listen", f"127.0.0.1:{pick_port()}", "--admin-listen", f"127.0.0.1:{pick_port()}",
                          "--policy-file", str(good_policy)],
                         capture_output=True, text=True, timeout=20, env=env, check=False,
                         stdin=subprocess.DEVNULL)
    assert_one_line(res, 2, "--without-config must be refuse or unlimited", "'sometimes'")


@pytest.mark.parametrize(("flag", "env", "value", "starts", "needle"), [
    ("--max-headers", "SLUICE_MAX_HEADERS", "many", "--max-headers must be a positive integer", "'many'"),
    ("--drain-s", "SLUICE_DRAIN_S", "soon", "--drain-s must be a number", "'soon'"),
    ("--breaker-cooldown-s", "SLUICE_BREAKER_COOLDOWN_S", "0", "--breaker-cooldown-s must be greater than 0",
     "got 0.0"),
    ("--log-level", "SLUICE_LOG_LEVEL", "loud", "--log-level must be debug or info or warning or error", "'loud'"),
], ids=["not-an-integer", "not-a-number", "not-positive", "not-a-choice"])
@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_value_is_checked_alike_from_a_flag_or_the_environment(
        flag: str, env: str, value: str, starts: str, needle: str, where: str, good_policy: Path) -> None:
    """One line naming the flag, exit 2, whichever way the value came (a number argparse cannot
    read was a usage message from a flag and a traceback from the environment)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    args = [flag, value] if where == "flag" else []
    if where == "env":
        environ[env] = value
    res = subprocess.run([sys.executable, "-m", "sluice_core.cli", "sidecar", "--upstream", "http://127.0.0.1:1",
                          "--listen", f"127.0.0.1:{pick_port()}", "--admin-listen", f"127.0.0.1:{pick_port()}",
                          "--policy-file", str(good_policy), *args],
                         capture_output=True, text=True, timeout=20, env=environ, check=False,
                         stdin=subprocess.DEVNULL)
    assert_one_line(res, 2, starts, needle)


@pytest.mark.parametrize("where", ["flag", "env"])
def test_an_empty_upstream_is_refused_in_one_line(where: str, good_policy: Path) -> None:
    """``--upstream`` is required: an empty one (flag or ``SLUICE_UPSTREAM=""``) is refused as
    any bad upstream is, exit 2, not a traceback."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    args = ["--upstream", ""] if where == "flag" else []
    if where == "env":
        environ["SLUICE_UPSTREAM"] = ""
    res = subprocess.run([sys.executable, "-m", "sluice_core.cli", "sidecar", "--listen", f"127.0.0.1:{pick_port()}",
                          "--admin-listen", f"127.0.0.1:{pick_port()}", "--policy-file", str(good_policy), *args],
                         capture_output=True, text=True, timeout=20, env=environ, check=False,
                         stdin=subprocess.DEVNULL)
    assert_one_line(res, 2, "--upstream must be http://HOST:PORT", "got ''")


def test_cluster_mode_unreadable_labels_refuses_to_start(tmp_path: Path) -> None:
    res = run_sidecar("--redis", "redis://127.0.0.1:1", "--namespace", "shop",
                      "--pod-labels", str(tmp_path / "labels"))
    assert_one_line(res, 1, "--pod-labels: ", "labels")


# --without-config in cluster mode: the config may arrive later, so the sidecar starts; until
# then it refuses (default; /readyz 503) or proxies unlimited (the injector's choice for a pod
# whose policies fail open, or that none selects; /readyz 200: a Redis outage must not hold up
# a rollout).
@pytest.mark.parametrize("without_config", ["refuse", "unlimited"])
async def test_cluster_mode_before_its_first_config(without_config: str, tmp_path: Path,
                                                    upstream: Upstream, fresh_redis: object) -> None:
    url = str(fresh_redis.url)  # type: ignore[attr-defined]  # no cluster document either
    ns = "wc-" + uuid.uuid4().hex[:8]
    sc = await start_sidecar(tmp_path, None, upstream=upstream, redis=url, policy_file=None, namespace=ns,
                             poll_interval_s=0.2, without_config=without_config)
    try:
        async with aiohttp.ClientSession() as http:
            async def status(path: str, admin: bool = False) -> int:
                async with http.get((sc.admin_url if admin else sc.url) + path) as r:
                    await r.read()
                    return r.status

            assert await status("/readyz", admin=True) == (503 if without_config == "refuse" else 200)
            async with http.get(sc.url + "/api") as r:
                if without_config == "refuse":
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
                    assert (await r.json(content_type=None))["detail"] == "no rate-limit policy is loaded yet"
                else:
                    assert r.status == 200
            seen = len(upstream.seen)
            assert seen == (0 if without_config == "refuse" else 1)
            policy = parse_policy(policy_doc(namespace=ns, tiers=[{"name": "free", "requests": 1, "period": "1h"}]))
            async with configstore.connect(url) as client:
                await configstore.publish(client, ns, configdoc.build_doc(ns, [policy], None, None))

            async def loaded() -> bool:
                # /readyz is 200 before the config with ``unlimited``: the loaded policy says it.
                async with http.get(sc.admin_url + "/admin/config") as r:
                    return "policy" in await r.json()

            await wait_for(loaded, timeout=10, what="the first config to load")
            assert await status("/readyz", admin=True) == 200
            assert [await status("/api"), await status("/api")] == [200, 429]
    finally:
        await sc.stop()
