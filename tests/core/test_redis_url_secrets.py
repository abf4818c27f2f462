"""A Redis URL whose password holds an unencoded ``/``, ``?``, ``#`` (the URL grammar splits it
there) never has any piece of that password in an error: not from the parser, not on the
stderr of ``sluice sidecar``, ``sluice operator`` or ``sluice apply``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sluice_core.redisurl import parse_redis_url
from support.redis_servers import pick_port
from support.sidecar_harness import policy_doc, write_file

# Each: the password, then the URL it is written into, unencoded. Ports that are numbers, hosts
# and databases that look valid: the pieces after the split must not parse as anything.
PASSWORDS = ["Zm9vYmFy/+qwXY", "ab12#sXwq99", "pq?zz=Wk&tVk9", "6399/Kq8vLm3w", "Hx7#Rt/Qw?Zp"]
TEMPLATES = ["redis://:{pw}@127.0.0.1:6379", "redis://app:{pw}@127.0.0.1", "rediss://{pw}@redis:6380/0",
             "redis+sentinel://app:{pw}@s1:26379,s2:26379/mymaster",
             "redis+cluster://:{pw}@n1:7000,n2:7001"]
CASES = [(pw, t.format(pw=pw)) for pw in PASSWORDS for t in TEMPLATES]


def assert_no_piece(password: str, text: str) -> None:
    """No run of 4 characters of the password appears in ``text``."""
    pieces = {password[i:i + 4] for i in range(len(password) - 3)}
    leaked = sorted(p for p in pieces if p in text)
    assert not leaked, (leaked, text)


@pytest.mark.parametrize(("password", "url"), CASES)
def test_the_parser_names_the_position_never_the_text(password: str, url: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_redis_url(url)
    assert "must be percent-encoded" in str(err.value)
    assert_no_piece(password, str(err.value))


def test_percent_encoded_the_same_passwords_parse() -> None:
    from urllib.parse import quote

    for pw in PASSWORDS:
        target = parse_redis_url(f"redis://app:{quote(pw, safe='')}@127.0.0.1:6379/2")
        assert (target.password, target.hosts, target.db) == (pw, (("127.0.0.1", 6379),), 2)
        assert_no_piece(pw, f"{target} {target!r}")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "sluice_core.cli", *argv], capture_output=True, text=True,
                          timeout=60, env=env, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("password", PASSWORDS)
def test_sluice_sidecar_stderr(password: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    write_file(policy, policy_doc())
    res = _run("sidecar", "--upstream", "http://127.0.0.1:1", "--policy-file", str(policy),
               "--listen", f"127.0.0.1:{pick_port()}", "--admin-listen", f"127.0.0.1:{pick_port()}",
               "--redis", f"redis://app:{password}@127.0.0.1:6379")
    assert res.returncode == 1, res
    assert res.stderr.startswith("sluice sidecar: --redis: redis URL: "), res.stderr
    assert "percent-encoded" in res.stderr
    assert_no_piece(password, res.stdout + res.stderr)


@pytest.mark.parametrize("flag", ["--redis", "--sidecar-redis"])
def test_sluice_operator_stderr(flag: str) -> None:
    password = PASSWORDS[-1]
    url = f"redis://app:{password}@127.0.0.1:6379"
    args = ["--redis", url] if flag == "--redis" else ["--redis", "redis://127.0.0.1:1", flag, url]
    res = _run("operator", *args)
    assert res.returncode == 1, res
    assert f"sluice operator: {flag}: redis URL: " in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert_no_piece(password, res.stdout + res.stderr)


def test_sluice_apply_stderr(tmp_path: Path) -> None:
    password = PASSWORDS[0]
    policy = tmp_path / "policy.yaml"
    write_file(policy, policy_doc())
    res = _run("apply", "-f", str(policy), "--redis", f"redis://:{password}@127.0.0.1:6379")
    assert res.returncode == 2, res
    assert "percent-encoded" in res.stderr
    assert_no_piece(password, res.stdout + res.stderr)
