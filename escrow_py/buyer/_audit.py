"""The buyer's audit trail: one append-only record per decision and per state change, in JSONL and SQLite.

A record says what was decided or what became of a payment, with the numbers that
matter to an auditor: the escrow id, the terms hash, the amount, the token, the
seller, the network, the reason code, transaction hashes. It never says what was
asked. By construction (records are built from a fixed list of fields, not by
dropping fields from something larger) it holds no private key, no signature, no
PAYMENT-SIGNATURE header, no request body, headers or query string; the host is
the only part of a URL it keeps, and `include_path=True` adds the path.

The SQLite table is the reference (one row per record, never updated or deleted by
this code); the JSONL file is the same records as lines, flushed and fsync'd, for
log shippers. Both are written (side by side: two files, two disk flushes at once) after
the journal's transaction commits and before the call that caused them returns; a write
that fails in either form raises.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from escrow_py.protocol.codec import to_hex
from escrow_py.protocol.terms import Terms
from escrow_py.storage import Migration, is_postgres_url, open_store, sqlite_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    event     TEXT NOT NULL,
    escrow_id TEXT,
    record    TEXT NOT NULL
)
"""
MIGRATIONS = (Migration(1, "audit", _SCHEMA),)


def audit_paths(journal: str | Path) -> tuple[Path | None, str | Path]:
    """Where the audit of a journal goes by default: beside a journal file, `<name>.audit.jsonl` and
    `.audit.sqlite`; for a PostgreSQL journal, its `audit` table (no JSONL: the fleet shares one trail)."""
    if is_postgres_url(journal):
        return None, str(journal)
    path = sqlite_path(journal)
    return path.with_name(path.stem + ".audit.jsonl"), path.with_name(path.stem + ".audit.sqlite")


def terms_fields(terms: Terms) -> dict[str, Any]:
    """What a record says about a payment's terms: never the request hash's preimage, which it cannot know."""
    return {
        "termsHash": to_hex(terms.hash()),
        "amount": terms.amount,
        "token": terms.token,
        "seller": terms.seller,
        "deadline": terms.deadline,
    }


# The JSONL appends, each on a worker while its caller commits the table (shared by every AuditLog; a worker
# thread is started only when needed).
_APPENDS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="audit-jsonl")


def _append(path: Path, lines: list[str]) -> None:
    """Append `lines` to the JSONL file and fsync it. Opened per write: a journal nobody closes leaves no file
    handle behind."""
    with path.open("a", encoding="utf-8") as jsonl:
        jsonl.write("".join(line + "\n" for line in lines))
        jsonl.flush()
        os.fsync(jsonl.fileno())


class AuditLog:
    """Appends records to `jsonl` (if given) and the `audit` table of `store`; safe to share between threads."""

    def __init__(self, jsonl: str | Path | None, store: str | Path, *, include_path: bool = False) -> None:
        self.jsonl_path = None if jsonl is None else Path(jsonl)
        self.include_path = include_path
        self._db = open_store(store, "buyer", MIGRATIONS, component="audit", pool_size=2)
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, journal: str | Path, *, include_path: bool = False) -> AuditLog:
        jsonl, store = audit_paths(journal)
        return cls(jsonl, store, include_path=include_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def write(self, event: str, escrow_id: bytes | None, fields: dict[str, Any]) -> dict[str, Any]:
        """Append one record; durable in both forms when this returns."""
        return self.write_many([(event, escrow_id, fields)])[0]

    def write_many(self, records: list[tuple[str, bytes | None, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Append (event, escrow id, fields) records in order, in one transaction and one fsync'd append: several
        records of one step cost one commit and one fsync of each form. Durable in both forms when this returns."""
        at = round(time.time(), 3)
        built = [
            {"at": at, "event": event, "escrowId": to_hex(escrow_id), **fields} for event, escrow_id, fields in records
        ]
        lines = [json.dumps(record, sort_keys=True) for record in built]
        with self._lock:
            # The two forms are two files: each waits for its own disk flush, so they are written side by side
            # (the table here, the lines on a worker thread), and both are durable before this returns.
            appended = None if self.jsonl_path is None else _APPENDS.submit(_append, self.jsonl_path, lines)
            try:
                with self._db.transaction() as tx:
                    tx.executemany(
                        "INSERT INTO audit (at, event, escrow_id, record) VALUES (?,?,?,?)",
                        [(r["at"], r["event"], r["escrowId"], line) for r, line in zip(built, lines, strict=True)],
                    )
            finally:
                if appended is not None:
                    appended.result()
        return built

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first, from the database's table."""
        rows = self._db.all("SELECT record FROM audit ORDER BY seq")
        return [json.loads(str(row[0])) for row in rows]
