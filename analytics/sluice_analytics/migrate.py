"""Schema versions: Alembic revisions in ``migrations/versions`` (0001, 0002, …), applied at
start-up by ``sluice analytics`` (or ``sluice analytics migrate``) in one transaction, one
replica at a time (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


async def upgrade(engine: AsyncEngine, target: str = "head") -> None:
    """Bring the database to ``target`` (a revision id, or ``head``)."""

    def run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), target)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def current(engine: AsyncEngine) -> str | None:
    """The database's revision (None: no schema yet)."""

    def read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)
