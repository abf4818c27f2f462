"""The analytics API fuzzed from its own OpenAPI document (schemathesis): every operation, valid
and invalid inputs, a bounded number of examples each: never a 5xx, and every answer conforms
to the document (status codes, content types, bodies). The server runs in a thread of its own
(schemathesis calls it synchronously) over a SQLite store with data and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.checks
from hypothesis import HealthCheck, given, settings
from sluice_analytics.openapi import document
from support.analytics_api import AUTH, ServerThread
from support.redis_servers import RedisServer
from support.usage_windows import Writer

EXAMPLES = 60  # per operation: bounded, so the file runs in seconds


@pytest.fixture
def served(tmp_path: Path, token_file: str, redis_server: RedisServer) -> Iterator[str]:
    server = ServerThread(tmp_path, token_file, redis_server.url, Writer(sources=2, clients=8).windows(4))
    try:
        yield server.url
    finally:
        server.close()


SCHEMA = schemathesis.openapi.from_dict(document())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_fuzzed_operations_never_fail(served: str, operation: Any) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Every check but "valid data accepted": the document cannot say every rule (a range
        # too large for its step, a date that does not exist), which the API answers with 400.
        case.call_and_validate(base_url=served, headers=AUTH,
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])

    check()
