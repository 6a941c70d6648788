"""The SQLite implementation of the port: one file, one connection shared by the threads of a process.

The discipline the project relies on: WAL journaling with `synchronous=FULL`, so a committed
transaction survives a crash or power loss, and a busy timeout so several threads or processes
can share a file. A write transaction takes the database's write lock up front (BEGIN IMMEDIATE),
which is why `lock()` and `for_update()` have nothing left to do here.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from escrow_py.storage._port import Engine, Rows

BUSY_TIMEOUT_MS = 30_000


def sqlite_path(url_or_path: str | Path) -> Path:
    """Accept `sqlite:///relative.db`, `sqlite:////abs/path.db` or a plain path."""
    text = str(url_or_path)
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    elif "://" in text:
        raise ValueError(f"not a SQLite URL or path: {text!r}")
    return Path(text).expanduser()


def open_sqlite(url_or_path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL."""
    path = sqlite_path(url_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    _journal_in_wal(conn, path)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _journal_in_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Switch the file to WAL, waiting out another connection doing the same.

    Two processes opening a new file at once (an agent and the tool that polls its journal) both ask
    for WAL: that needs the file to themselves, and SQLite refuses one of them at once, busy timeout or
    not (waiting could deadlock). Once the other has switched, the same pragma is a no-op.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"{path}: journal_mode is {mode!r}, not WAL (a read-only or in-memory file?)")


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception. Durable once the block exits."""
    conn.execute(begin)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteTx:
    engine: Engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self.conn.execute(sql, tuple(params))

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.conn.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, tuple(params)).fetchall())

    def lock(self, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already excludes every other writer of the file."""

    def try_lock(self, key: str) -> bool:
        return True

    def for_update(self, *, skip_locked: bool = True) -> str:
        return ""


class SqliteDatabase:
    """One SQLite file; safe to share between threads (one transaction at a time on its connection)."""

    engine: Engine = "sqlite"

    def __init__(self, url_or_path: str | Path) -> None:
        self.path = sqlite_path(url_or_path)
        self.url = str(url_or_path)
        self.conn = open_sqlite(self.path)
        # One connection shared by threads: one transaction at a time on it (BEGIN IMMEDIATE orders processes).
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[SqliteTx]:
        with self._lock, transaction(self.conn):
            yield SqliteTx(self.conn)

    @contextmanager
    def read(self) -> Iterator[SqliteTx]:
        with self._lock, transaction(self.conn, "BEGIN DEFERRED"):
            yield SqliteTx(self.conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self.conn.execute(sql, tuple(params)).fetchone()
            return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self.conn.execute(sql, tuple(params)).fetchall())

    def tables(self) -> set[str]:
        return {str(r[0]) for r in self.all("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def close(self) -> None:
        with self._lock:
            self.conn.close()
