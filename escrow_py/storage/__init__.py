"""Durable state for every role, on SQLite (the embedded default: one file per role) or PostgreSQL.

Every store is written against one small port (`Database`, `Tx`), so one SQL text runs on both
engines; `open_database(url, namespace)` picks the engine from the URL:

    sqlite:///relative.db, sqlite:////abs/path.db or a plain path   → SqliteDatabase
    postgresql://user@host/db (or postgres://)                     → PostgresDatabase (psycopg 3, pooled)

The SQLite discipline is WAL with `synchronous=FULL` (a committed transaction survives a crash
or power loss) and write transactions that take the write lock up front (BEGIN IMMEDIATE), so a
read-then-write cannot race another writer. On PostgreSQL the same guarantee comes from
`tx.lock(key)` (an advisory lock held to the end of the transaction) or row claims with
`tx.for_update()` (FOR UPDATE SKIP LOCKED). Schemas evolve through versioned `Migration`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from escrow_py.storage._migrate import Migration, current_version, ddl, migrate, run_script
from escrow_py.storage._port import Database, Engine, Rows, Tx
from escrow_py.storage._postgres import PostgresDatabase, is_postgres_url, redact
from escrow_py.storage._sqlite import (
    BUSY_TIMEOUT_MS,
    SqliteDatabase,
    open_sqlite,
    sqlite_path,
    transaction,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
    "Database",
    "Engine",
    "Migration",
    "PostgresDatabase",
    "Rows",
    "SqliteDatabase",
    "Tx",
    "current_version",
    "ddl",
    "describe",
    "is_postgres_url",
    "migrate",
    "open_database",
    "open_sqlite",
    "open_store",
    "redact",
    "run_script",
    "sqlite_path",
    "transaction",
]


def open_database(url: str | Path, namespace: str, *, pool_size: int = 10) -> Database:
    """The database at `url`; on PostgreSQL, `namespace` is the schema this role's tables live in.

    Raises ValueError for a URL of another engine, ConfigError when PostgreSQL cannot be reached.
    """
    if is_postgres_url(url):
        return PostgresDatabase(str(url), namespace, max_size=pool_size)
    return SqliteDatabase(url)


def describe(url: str | Path) -> str:
    """The URL as it may be shown: a PostgreSQL password is masked."""
    return redact(str(url)) if is_postgres_url(url) else str(url)


def open_store(
    url: str | Path, namespace: str, migrations: Sequence[Migration], *, component: str | None = None,
    pool_size: int = 10,
) -> Database:  # fmt: skip
    """`open_database`, then the store's migrations applied (each once, whoever starts first).

    `component` names the migrations' sequence when one namespace holds several (default: the namespace).
    """
    db = open_database(url, namespace, pool_size=pool_size)
    try:
        migrate(db, component or namespace, migrations)
    except BaseException:
        db.close()
        raise
    return db
