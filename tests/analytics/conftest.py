"""Fixtures of the usage collector's tests: a throwaway PostgreSQL for the session, and every
store test run twice, on SQLite (a file of its own) and on PostgreSQL (a database of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sluice_analytics import database, migrate
from sqlalchemy.ext.asyncio import AsyncEngine
from support.analytics_api import TOKEN
from support.postgres import PostgresNotInstalled, PostgresServer


def _started() -> PostgresServer:
    try:
        return PostgresServer()
    except PostgresNotInstalled as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session: each test takes a database of its own (``create_database``)."""
    server = _started()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fresh_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: free to stop and start."""
    server = _started()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.url(server.create_database())


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The database at the current schema revision."""
    eng = database.connect(database_url)
    await migrate.upgrade(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)
