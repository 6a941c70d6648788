"""The storage port on both engines: one SQL text, transactions, locks, claims, migrations."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from escrow_devtools.bench.postgres import PostgresServer
from escrow_py.protocol.errors import ConfigError
from escrow_py.storage import Database, Migration, current_version, ddl, migrate, open_database
from escrow_py.storage._postgres import to_pyformat

SCHEMA = [
    Migration(1, "items", "CREATE TABLE items (id BLOB PRIMARY KEY, n INTEGER NOT NULL, at REAL NOT NULL, note TEXT)"),
    Migration(2, "claims", "ALTER TABLE items ADD COLUMN claimed_by TEXT; CREATE INDEX items_n ON items (n)"),
]


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url, "porttest")
    migrate(database, "porttest", SCHEMA)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def opened() -> Iterator[Callable[..., Database]]:
    """open_database, each database closed after the test (a PostgreSQL pool has threads)."""
    databases: list[Database] = []

    def opener(url: str, namespace: str = "porttest", **kw: int) -> Database:
        databases.append(open_database(url, namespace, **kw))
        return databases[-1]

    try:
        yield opener
    finally:
        for database in databases:
            database.close()


def test_one_sql_text_runs_on_both_engines(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO items (id, n, at, note) VALUES (?, ?, ?, ?)",
            (b"\x00" * 31 + b"\x01", 2**62, 1.7e9 + 0.123, "50%?"),
        )
        tx.executemany(
            "INSERT INTO items (id, n, at) VALUES (?, ?, ?)", [(bytes([i]) * 32, i, 0.5) for i in range(2, 5)]
        )
        tx.execute(
            "INSERT INTO items (id, n, at) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE SET n = excluded.n",
            (b"\x02" * 32, 20, 0.5),
        )
    row = db.one("SELECT id, n, at, note FROM items WHERE note LIKE '%?' AND n > ?", (0,))
    # bytes32 ids come back as bytes, 64-bit integers and double-precision wall times intact.
    assert row == (b"\x00" * 31 + b"\x01", 2**62, 1.7e9 + 0.123, "50%?")
    assert db.all("SELECT n FROM items WHERE id = ?", (b"\x02" * 32,)) == [(20,)]
    assert db.execute("UPDATE items SET note = 'x' WHERE n < ?", (10,)) == 2


def test_a_failed_transaction_leaves_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO items (id, n, at) VALUES (?, ?, ?)", (b"a" * 32, 1, 0.0))
        raise RuntimeError("handler failed")
    assert db.all("SELECT * FROM items") == []


def test_lock_serialises_read_then_write_across_pools(db_url: str, opened: Callable[..., Database]) -> None:
    """Four pools (as four processes would have) increment one counter by read-then-write: none is lost."""
    first = opened(db_url, "porttest")
    migrate(first, "porttest", SCHEMA)
    first.execute("INSERT INTO items (id, n, at) VALUES (?, 0, 0)", (b"c" * 32,))
    pools = [opened(db_url, "porttest", pool_size=2) for _ in range(4)]

    def bump(db: Database) -> None:
        for _ in range(25):
            with db.transaction() as tx:
                tx.lock("counter")
                (n,) = tx.one("SELECT n FROM items WHERE id = ?", (b"c" * 32,)) or (0,)
                tx.execute("UPDATE items SET n = ? WHERE id = ?", (n + 1, b"c" * 32))

    threads = [threading.Thread(target=bump, args=(p,)) for p in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first.one("SELECT n FROM items WHERE id = ?", (b"c" * 32,)) == (100,)


def test_claims_split_rows_between_workers(db_url: str, opened: Callable[..., Database]) -> None:
    """Workers claiming `LIMIT 7 ... FOR UPDATE SKIP LOCKED` batches each take disjoint rows, and all of them."""
    first = opened(db_url, "porttest")
    migrate(first, "porttest", SCHEMA)
    with first.transaction() as tx:
        tx.executemany(
            "INSERT INTO items (id, n, at) VALUES (?, ?, 0)", [(i.to_bytes(32, "big"), i) for i in range(300)]
        )
    claimed: dict[str, list[int]] = {}

    def work(name: str, db: Database) -> None:
        mine = claimed.setdefault(name, [])
        while True:
            with db.transaction() as tx:
                rows = tx.all(f"SELECT n FROM items WHERE claimed_by IS NULL ORDER BY n LIMIT 7{tx.for_update()}")
                tx.executemany("UPDATE items SET claimed_by = ? WHERE n = ?", [(name, r[0]) for r in rows])
            if not rows:
                return
            mine.extend(r[0] for r in rows)

    threads = [threading.Thread(target=work, args=(f"w{i}", opened(db_url, "porttest"))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [n for ns in claimed.values() for n in ns]
    assert sorted(every) == list(range(300))
    for name, ns in claimed.items():
        assert first.all("SELECT COUNT(*) FROM items WHERE claimed_by = ?", (name,)) == [(len(ns),)]


def test_try_lock_is_exclusive_on_postgres(postgres_server: PostgresServer, opened: Callable[..., Database]) -> None:
    url = postgres_server.fresh()
    a, b = opened(url, "porttest"), opened(url, "porttest")
    with a.transaction() as held:
        assert held.try_lock("poster")
        with b.transaction() as other:
            assert not other.try_lock("poster")
            assert other.try_lock("another")
    with b.transaction() as other:
        assert other.try_lock("poster")


def test_migrations_apply_once_and_refuse_a_newer_schema(db_url: str, opened: Callable[..., Database]) -> None:
    db = opened(db_url, "porttest")
    assert [m.version for m in migrate(db, "porttest", SCHEMA[:1])] == [1]
    assert current_version(db, "porttest") == 1
    assert [m.version for m in migrate(db, "porttest", SCHEMA)] == [2]
    assert migrate(db, "porttest", SCHEMA) == []
    assert current_version(db, "other") == 0
    with pytest.raises(ConfigError, match="version 2, newer than this code's 1"):
        migrate(db, "porttest", SCHEMA[:1])


def test_concurrent_starts_migrate_once(db_url: str, opened: Callable[..., Database]) -> None:
    ran: list[int] = []
    counted = [*SCHEMA[:1], Migration(2, "counted", "CREATE TABLE t2 (x INTEGER)", run=lambda tx: ran.append(1))]
    dbs = [opened(db_url, "porttest") for _ in range(4)]
    threads = [threading.Thread(target=migrate, args=(d, "porttest", counted)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ran == [1]
    assert "t2" in dbs[0].tables()


def test_processes_opening_a_new_sqlite_file_at_once_all_open_it(tmp_path: Path) -> None:
    """An agent creating its journal while a tool polls it: both switch the new file to WAL, which SQLite
    grants one of them and refuses the other at once (no busy wait); the refused one must wait, not fail."""
    failures: list[BaseException] = []
    for round_ in range(100):  # the race is narrow: on the old code a few rounds in a hundred failed
        path = tmp_path / f"new-{round_}.sqlite"
        start = threading.Barrier(4)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                open_database(f"sqlite:///{path}", "porttest").close()
            except BaseException as exc:  # collected and asserted below
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_roles_on_one_postgres_url_keep_their_tables_apart(
    postgres_server: PostgresServer, opened: Callable[..., Database]
) -> None:
    url = postgres_server.fresh()
    a, b = opened(url, "role_a"), opened(url, "role_b")
    migrate(a, "x", SCHEMA[:1])
    migrate(b, "x", SCHEMA[:1])
    a.execute("INSERT INTO items (id, n, at) VALUES (?, 1, 0)", (b"a",))
    assert b.all("SELECT * FROM items") == []


def test_bad_urls_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a SQLite URL or path: 'mysql://x/y'"):
        open_database("mysql://x/y", "porttest")
    with pytest.raises(
        ConfigError,
        match=r"postgresql://u:\*\*\*@127.0.0.1:1/db\?connect_timeout=2: cannot open the PostgreSQL database: .*",
    ):
        open_database("postgresql://u:secret@127.0.0.1:1/db?connect_timeout=2", "porttest")


def test_parameter_rewrite_and_ddl_translation() -> None:
    assert to_pyformat("SELECT '?', '%' || x FROM t WHERE a = ? AND b LIKE 'it''s ?%' AND c % 2 = ?") == (
        "SELECT '?', '%%' || x FROM t WHERE a = %s AND b LIKE 'it''s ?%%' AND c %% 2 = %s"
    )
    assert ddl("postgresql", "id BLOB, n INTEGER, at REAL, k INTEGER PRIMARY KEY AUTOINCREMENT") == (
        "id BYTEA, n BIGINT, at DOUBLE PRECISION, k BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    )
    assert ddl("sqlite", "id BLOB") == "id BLOB"
