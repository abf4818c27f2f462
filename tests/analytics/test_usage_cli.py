"""``sluice usage top|series|report|limited`` against a running analytics API: ``--json`` gives
the API's answer (equal to what the test wrote), the tables carry the same numbers, problems
come back as one ``error:`` line naming the parameter, and the token is never printed."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sluice_core import cli
from sluice_core.usage import UsageWindow
from support.analytics_api import TOKEN, ServerThread
from support.redis_servers import RedisServer
from support.usage_windows import Writer

NOW = int(time.time())
START_MS = (NOW - NOW % 3600 - 3600) * 1000  # the last hour but one: inside --since 3h


@pytest.fixture(scope="module")
def windows() -> list[UsageWindow]:
    return Writer(sources=3, clients=9, start_ms=START_MS).windows(6)


@pytest.fixture
def served(tmp_path: Path, token_file: str, redis_server: RedisServer,
           windows: list[UsageWindow]) -> Iterator[tuple[str, str]]:
    server = ServerThread(tmp_path, token_file, redis_server.url, windows)
    try:
        yield server.url, token_file
    finally:
        server.close()


def sluice(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


def per_client(windows: list[UsageWindow], outcome: str | None = None) -> Counter[str]:
    c: Counter[str] = Counter()
    for w in windows:
        for r in w.rows:
            if outcome is None or r.outcome == outcome:
                c[r.client] += r.requests
    return c


def test_usage_commands(served: tuple[str, str], windows: list[UsageWindow], capsys: pytest.CaptureFixture[str]) -> None:
    url, token_file = served
    api: Any = ("--url", url, "--token-file", token_file, "--namespace", "shop")
    code, out, _ = sluice(capsys, "usage", "top", *api, "--since", "3h", "--limit", "100", "--json")
    assert code == 0
    assert {c["client"]: c["requests"] for c in json.loads(out)["consumers"]} == per_client(windows)
    code, out, _ = sluice(capsys, "usage", "top", *api, "--since", "3h", "--by", "limited", "--limit", "100")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["CLIENT", "REQUESTS", "LIMITED", "TOKENS"]
    assert {ln.split()[0]: int(ln.split()[2]) for ln in lines[1:]} == per_client(windows, "limited")
    code, out, _ = sluice(capsys, "usage", "series", *api, "--since", "3h", "--step", "1h", "--json")
    assert code == 0 and sum(p["requests"] for p in json.loads(out)["points"]) == sum(per_client(windows).values())
    day = time.strftime("%Y-%m-%d", time.gmtime(START_MS // 1000))
    code, out, _ = sluice(capsys, "usage", "report", *api, "--from", day, "--to", day)
    assert code == 0
    assert {r["client"]: int(r["requests"]) for r in csv.DictReader(io.StringIO(out))} == per_client(windows)
    code, out, _ = sluice(capsys, "usage", "limited", *api, "--json")
    assert code == 0 and json.loads(out)["minutes"] == 5
    code, _, err = sluice(capsys, "usage", "series", *api, "--since", "3d", "--step", "1m")
    assert code == 2 and err.startswith("error: 400 Bad Request: step: too small for the range")
    code, _, err = sluice(capsys, "usage", "top", "--url", url, "--token", "nope", "--namespace", "shop")
    assert code == 2 and err.startswith("error: 401 Unauthorized")
