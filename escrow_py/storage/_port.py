"""The database port every role's store is written against.

One SQL text runs on both engines. The rules that make that true:
- parameters are written `?` (the port rewrites them for psycopg);
- upserts are `INSERT ... ON CONFLICT (...) DO UPDATE/NOTHING` (both engines), never `INSERT OR ...`;
- column types are written the SQLite way (INTEGER, REAL, TEXT, BLOB) in migrations; on PostgreSQL the
  DDL is translated to BIGINT, DOUBLE PRECISION, TEXT and BYTEA, so ids are bytes on both engines;
- row locks are `tx.for_update()` (" FOR UPDATE SKIP LOCKED" on PostgreSQL, nothing on SQLite, whose
  write transactions already hold the whole database), and cross-process mutual exclusion is
  `tx.lock(key)` (a transaction-scoped advisory lock on PostgreSQL; on SQLite the write transaction's
  BEGIN IMMEDIATE already excludes every other writer).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

Engine = Literal["sqlite", "postgresql"]


class Rows(Protocol):
    """What one statement returns: both sqlite3's and psycopg's cursors are this."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """One open transaction (or, for `Database.read`, one consistent read)."""

    engine: Engine

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement with `?` parameters."""
        ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter tuple (row counts are not reported)."""
        ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row, or None."""
        ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row."""
        ...

    def lock(self, key: str) -> None:
        """Hold a lock named `key` until this transaction ends; other transactions asking for it wait."""
        ...

    def try_lock(self, key: str) -> bool:
        """Take the lock named `key` until this transaction ends if nobody holds it; False if someone does."""
        ...

    def for_update(self, *, skip_locked: bool = True) -> str:
        """The clause to append to a SELECT that claims the rows it reads (empty on SQLite)."""
        ...


class Database(Protocol):
    """A pool of connections to one database, SQLite or PostgreSQL, with the same SQL on both."""

    engine: Engine
    url: str  # as given, minus any password, for messages

    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction: committed (durably) when the block exits, rolled back on any exception.

        On SQLite it takes the write lock up front (BEGIN IMMEDIATE), so a read-then-write never races.
        On PostgreSQL it runs at READ COMMITTED: take `tx.lock(...)` or claim rows `tx.for_update()`
        where a read-then-write must not race another process.
        """
        ...

    def read(self) -> AbstractContextManager[Tx]:
        """A read-only transaction: one consistent snapshot, no write lock taken."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own write transaction; returns its row count."""
        ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """One read: the first row, or None."""
        ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read: every row. Also one write statement whose rows it returns (UPDATE ... RETURNING), in a
        transaction of its own that is committed when this returns: no BEGIN and COMMIT round trips around it."""
        ...

    def tables(self) -> set[str]:
        """The tables of this store (its PostgreSQL schema, or the SQLite file)."""
        ...

    def close(self) -> None: ...
