"""Schema revisions on SQLite and PostgreSQL: an upgrade from the previous revision keeps the
data (and the collector goes on adding to it), and the head revision is exactly schema.py."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sluice_analytics import database, migrate, store
from sluice_analytics.schema import metadata
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from support.usage_windows import Writer, stored_totals

NOW = 1_790_000_000 + 3600


async def test_upgrade_from_the_previous_revision_keeps_the_data(database_url: str) -> None:
    engine = database.connect(database_url)
    try:
        await migrate.upgrade(engine, "0001")
        assert await migrate.current(engine) == "0001"
        writer = Writer()
        # A collector of revision 0001 wrote these (its tables are the same; 0002 adds an index, 0003 the alerts table).
        await store.apply(engine, writer.windows(3), now_s=NOW, keep_applied_s=3600)
        await migrate.upgrade(engine)
        assert await migrate.current(engine) == migrate.head() == "0003"
        assert await stored_totals(engine) == writer.totals
        more = writer.windows(2)
        await store.apply(engine, more, now_s=NOW, keep_applied_s=3600)
        assert await stored_totals(engine) == writer.totals

        def indexes(conn: Connection) -> set[str]:
            return {i["name"] for i in inspect(conn).get_indexes("usage_minute") if i["name"]}

        async with engine.connect() as conn:
            assert "ix_usage_minute_outcome_ts" in await conn.run_sync(indexes)
        await migrate.upgrade(engine)  # at head: nothing to do
    finally:
        await engine.dispose()


async def test_head_is_the_schema_the_code_uses(database_url: str) -> None:
    engine = database.connect(database_url)
    try:
        await migrate.upgrade(engine)

        def diff(conn: Connection) -> list[object]:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()
