"""The PostgreSQL implementation of the port: psycopg 3 with a connection pool.

Each role keeps its tables in its own PostgreSQL schema (`keeper`, `buyer`, `seller`), so one
database URL serves every role without two `payments` tables meeting; the pool sets the
`search_path` of each connection, and the SQL never names the schema.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from escrow_py.protocol.errors import ConfigError
from escrow_py.storage._port import Engine, Rows

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A string literal, or a `?` or `%` outside one: what the parameter rewrite must tell apart.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\?|%")


def is_postgres_url(url: object) -> bool:
    return isinstance(url, str) and url.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """`?` parameters to psycopg's `%s` (a `?` inside a string literal stays), and every `%` to `%%`
    (psycopg reads placeholders inside literals too)."""

    def swap(match: re.Match[str]) -> str:
        piece = match.group(0)
        return "%s" if piece == "?" else piece.replace("%", "%%")

    return _TOKENS.sub(swap, sql)


def lock_id(key: str) -> int:
    """A lock name as the signed 64-bit key PostgreSQL's advisory locks take."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class PostgresTx:
    """One transaction on one connection, in as few round trips as its results allow.

    What needs no answer (the BEGIN, an advisory lock) is not sent alone: it waits and goes with the next
    statement, in one pipeline (one round trip). The order the server runs them in is the order they were
    written, and at READ COMMITTED each statement reads a snapshot taken when it starts, so a statement sent
    behind a lock still reads what was committed before the lock was granted to it.
    """

    engine: Engine = "postgresql"

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], namespace: str, *, begin: str | None = None) -> None:
        self.conn = conn
        self.namespace = namespace
        self._waiting: list[tuple[str, tuple[Any, ...]]] = [] if begin is None else [(begin, ())]
        self.begun = begin is None  # True once a BEGIN (if any) has reached the server

    def _send(self, sql: str, params: tuple[Any, ...]) -> psycopg.Cursor[tuple[Any, ...]]:
        """Run `sql` after whatever waits to be sent, all in one round trip."""
        if not self._waiting:
            return self.conn.execute(sql, params)
        waiting, self._waiting = self._waiting, []
        self.begun = True
        with self.conn.pipeline():
            for query, args in waiting:
                self.conn.execute(query, args)
            return self.conn.execute(sql, params)

    def finish(self, sql: str) -> None:
        """COMMIT or ROLLBACK, if anything was sent; what only waited (a BEGIN, a lock) is dropped unsent."""
        self._waiting = []
        if self.begun:
            self.conn.execute(sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self._send(to_pyformat(sql), tuple(params))

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        waiting, self._waiting = self._waiting, []
        self.begun = True
        with self.conn.pipeline(), self.conn.cursor() as cursor:
            for query, args in waiting:
                cursor.execute(query, args)
            cursor.executemany(to_pyformat(sql), [tuple(p) for p in params])

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self._send(to_pyformat(sql), tuple(params)).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._send(to_pyformat(sql), tuple(params)).fetchall()

    def lock(self, key: str) -> None:
        # Granted before the next statement runs (the server runs a pipeline in order): sent with it.
        self._waiting.append(("SELECT pg_advisory_xact_lock(%s)", (lock_id(f"{self.namespace}:{key}"),)))

    def try_lock(self, key: str) -> bool:
        got = self._send("SELECT pg_try_advisory_xact_lock(%s)", (lock_id(f"{self.namespace}:{key}"),)).fetchone()
        return bool(got and got[0])

    def for_update(self, *, skip_locked: bool = True) -> str:
        return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"


class PostgresDatabase:
    """A pool of connections to `url`, every one working in the PostgreSQL schema `namespace`."""

    engine: Engine = "postgresql"

    def __init__(self, url: str, namespace: str, *, max_size: int = 10, timeout: float = 30.0) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"storage namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ConfigError(
                f"{redact(url)}: PostgreSQL needs the postgres extra: pip install 'x402-escrow[postgres]'"
            ) from None
        self.url = redact(url)
        self.namespace = namespace

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.execute(f'SET search_path TO "{namespace}"')

        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True},
            configure=configure,
            timeout=timeout,
            open=False,
            name=f"x402-escrow-{namespace}",
        )
        try:
            # One plain connection first: a wrong URL fails now with the server's own words, where the
            # pool would retry in the background until its timeout.
            with psycopg.connect(url, autocommit=True, connect_timeout=int(timeout)) as conn, conn.transaction():
                # Two processes starting at once must not both create the schema.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(f"schema:{namespace}"),))
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{namespace}"')
            self._pool.open(wait=True, timeout=timeout)
        except (psycopg.Error, TimeoutError, OSError) as exc:
            self._pool.close()
            raise ConfigError(f"{self.url}: cannot open the PostgreSQL database: {exc}") from None

    @contextmanager
    def transaction(self) -> Iterator[PostgresTx]:
        # BEGIN goes with the first statement (PostgresTx), so a transaction costs one round trip per
        # statement whose answer is needed, plus the COMMIT, whose answer is the durability it waits for.
        with self._pool.connection() as conn:
            tx = PostgresTx(conn, self.namespace, begin="BEGIN")
            try:
                yield tx
            except BaseException:
                # A broken connection cannot roll back: the pool discards it, and the server ends the transaction.
                with contextlib.suppress(Exception):
                    tx.finish("ROLLBACK")
                raise
            tx.finish("COMMIT")

    @contextmanager
    def read(self) -> Iterator[PostgresTx]:
        with self.transaction() as tx:
            yield tx

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._pool.connection() as conn:
            return conn.execute(to_pyformat(sql), tuple(params)).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn:
            return conn.execute(to_pyformat(sql), tuple(params)).fetchall()

    def tables(self) -> set[str]:
        rows = self.all("SELECT tablename FROM pg_tables WHERE schemaname = ?", (self.namespace,))
        return {str(r[0]) for r in rows}

    def close(self) -> None:
        self._pool.close()
