"""The async engine for a ``--database`` URL: SQLite through aiosqlite, PostgreSQL through asyncpg.

SQLite is set up for several writers on one file: WAL (readers never block the writer), a busy
timeout (a writer waits for the other instead of failing), and every transaction begun with
``BEGIN IMMEDIATE``, so it holds the write lock from its first statement: a transaction that
read first and wrote later could otherwise be refused (``SQLITE_BUSY``) instead of waiting.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_S = 30.0


def async_url(text: str) -> URL:
    """``sqlite:///x`` → ``sqlite+aiosqlite:///x``; ``postgresql://`` → ``postgresql+asyncpg://``."""
    url = make_url(text)
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if url.get_backend_name() in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database {url.get_backend_name()!r} (sqlite or postgresql)")


def shown(text: str) -> str:
    """The URL for a log line: the password masked."""
    return make_url(text).render_as_string(hide_password=True)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def connect(text: str, *, pool_size: int = 2) -> AsyncEngine:
    url = async_url(text)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        _sqlite_transactions(engine)
        return engine
    # A statement that hangs (a stopped PostgreSQL that keeps the socket) ends with an error.
    return create_async_engine(url, pool_size=pool_size, pool_pre_ping=True,
                               connect_args={"timeout": 10, "command_timeout": 60})


def _sqlite_transactions(engine: AsyncEngine) -> None:
    sync = engine.sync_engine

    @event.listens_for(sync, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN off: ours below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, no torn DB
        cursor.close()

    @event.listens_for(sync, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
