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
log shippers. Both are written after the journal's transaction commits and before
the call that caused them returns.
"""

from __future__ import annotations

import json
import os
import threading
import time
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
        record = {"at": round(time.time(), 3), "event": event, "escrowId": to_hex(escrow_id), **fields}
        line = json.dumps(record, sort_keys=True)
        with self._lock:
            self._db.execute(
                "INSERT INTO audit (at, event, escrow_id, record) VALUES (?,?,?,?)",
                (record["at"], event, record["escrowId"], line),
            )
            if self.jsonl_path is not None:
                # Opened per record: a journal nobody closes leaves no file handle behind.
                with self.jsonl_path.open("a", encoding="utf-8") as jsonl:
                    jsonl.write(line + "\n")
                    jsonl.flush()
                    os.fsync(jsonl.fileno())
        return record

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first, from the database's table."""
        rows = self._db.all("SELECT record FROM audit ORDER BY seq")
        return [json.loads(str(row[0])) for row in rows]
