"""Counting SQLite transactions through the real stack: every connection opened after `install` reports its
statements (with the database file), for tests that pin what a request costs."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest


class SqliteTrace:
    """Counts the transactions of every SQLite connection opened while it is installed."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.files: list[str] = []  # the database file of each statement

    def connect(self, real: Any) -> Any:
        def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn: sqlite3.Connection = real(*args, **kwargs)
            path = str(args[0] if args else kwargs.get("database", ""))

            def seen(statement: str) -> None:
                self.statements.append(statement)
                self.files.append(path)

            conn.set_trace_callback(seen)
            return conn

        return traced

    def since(self, mark: int) -> SqliteTrace:
        """The statements from the `mark`-th on (a mark is `len(trace.statements)` taken earlier)."""
        tail = SqliteTrace()
        tail.statements, tail.files = self.statements[mark:], self.files[mark:]
        return tail

    def transactions(self, file_suffix: str = "") -> int:
        """Explicit BEGIN ... COMMIT blocks plus the writes run on their own in autocommit mode (only in the
        database files whose name ends with `file_suffix`, if given)."""
        count, inside = 0, False
        for statement, path in zip(self.statements, self.files, strict=True):
            if file_suffix and not path.endswith(file_suffix):
                continue
            word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
            if word == "BEGIN":
                count, inside = count + 1, True
            elif word in ("COMMIT", "ROLLBACK", "END"):
                inside = False
            elif not inside and word in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
                count += 1
        return count


def install(monkeypatch: pytest.MonkeyPatch) -> SqliteTrace:
    """A SqliteTrace of every connection opened from now on (until the test ends)."""
    tracer = SqliteTrace()
    monkeypatch.setattr(sqlite3, "connect", tracer.connect(sqlite3.connect))
    return tracer
