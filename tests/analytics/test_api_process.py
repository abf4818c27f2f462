"""The whole path through the real process: windows XADDed to the stream, applied by a running
``sluice analytics`` (started with its API token), read back with ``sluice usage`` from the
same port as ``/metrics``: the totals are exact."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from sluice_core import cli
from support.analytics_process import CollectorProcess
from support.polling import poll
from support.redis_servers import RedisServer
from support.usage_windows import StoredView, Writer, xadd_sync

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_collector_serves_the_api(fresh_redis: RedisServer, database_url: str, token_file: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    now = int(time.time())
    writer = Writer(sources=2, clients=6, start_ms=(now - 600) * 1000)
    windows = writer.windows(5)
    xadd_sync(fresh_redis.client(), windows)
    c = CollectorProcess(fresh_redis.url, database_url, extra=("--api-token-file", token_file))
    try:
        view = StoredView(database_url)
        poll(lambda: view.applied() == len(windows), "every window applied", diagnose=c.log_tail)
        argv = ["usage", "top", "--url", f"http://127.0.0.1:{c.port}", "--token-file", token_file,
                "--namespace", "shop", "--since", "1h", "--limit", "100", "--json"]
        assert cli.main(argv) == 0
        got = {x["client"]: x["requests"] for x in json.loads(capsys.readouterr().out)["consumers"]}
        want: Counter[str] = Counter()
        for (_ns, client, _outcome), n in writer.totals.items():
            want[client] += n
        assert got == want
        assert cli.main([*argv[:4], "--namespace", "shop"]) == 2  # no token: 401
        assert "401" in capsys.readouterr().err
    finally:
        c.stop()
