"""Fixtures shared by the files of tests/k8s (the control plane itself is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sluice_analytics import database, migrate
from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The collector's store on SQLite, migrated (its API and status tests against the API server
    need one; tests/analytics runs both SQLite and PostgreSQL)."""
    eng = database.connect(f"sqlite:///{tmp_path / 'usage.db'}")
    await migrate.upgrade(eng)
    yield eng
    await eng.dispose()
