"""Durable local state for every role: one SQLite file each by default.

Every store opens its database through `open_sqlite`, which sets the one
discipline the project relies on: WAL journaling with `synchronous=FULL`, so a
committed transaction survives a crash or power loss, and a busy timeout so
several threads or processes can share a file. Write through `transaction()`,
which takes the write lock up front (BEGIN IMMEDIATE) so a read-then-write
cannot race another writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception. Durable once the block exits."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
