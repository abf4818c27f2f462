"""Alembic's environment for ``sluice analytics``: always run from :mod:`sluice_analytics.migrate`
on a connection it passes in (``config.attributes["connection"]``), inside its transaction."""

from __future__ import annotations

from alembic import context
from sluice_analytics.schema import metadata
from sqlalchemy import text

MIGRATION_LOCK = 0x51_0CE_A7A  # PostgreSQL advisory lock: replicas starting together migrate one at a time


def run() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        context.run_migrations()


run()
