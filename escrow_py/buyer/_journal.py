"""The buyer's journal: every signed payment, committed before the payment leaves the process.

One SQLite file (escrow_py.storage discipline: WAL, synchronous=FULL). A row is
enough for a new process to find the escrow on chain and replay the request:
the request itself (the buyer's own data), the terms, the PAYMENT-SIGNATURE
value, and what became of it.

States: `signed` (committed; whether it reached the seller is unknown),
`rejected` (the seller refused it; not deposited when checked), `held`
(deposited, not delivered), and the final ones `delivered` (body hash verified),
`mismatch` (the body differs from the committed hash), `refunded`, `void`
(never deposited and the authorization expired).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from escrow_py.storage import open_sqlite, transaction
from escrow_py.terms import Terms


class PaymentState(StrEnum):
    SIGNED = "signed"
    REJECTED = "rejected"
    HELD = "held"
    DELIVERED = "delivered"
    MISMATCH = "mismatch"
    REFUNDED = "refunded"
    VOID = "void"

    @property
    def final(self) -> bool:
        return self in (PaymentState.DELIVERED, PaymentState.MISMATCH, PaymentState.REFUNDED, PaymentState.VOID)


UNFINISHED = tuple(s.value for s in PaymentState if not s.final)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    escrow_id      BLOB PRIMARY KEY,
    chain_id       INTEGER NOT NULL,
    escrow         TEXT NOT NULL,
    method         TEXT NOT NULL,
    url            TEXT NOT NULL,
    headers        TEXT NOT NULL,
    body           BLOB NOT NULL,
    terms          TEXT NOT NULL,
    valid_before   INTEGER NOT NULL,
    payment_header TEXT NOT NULL,
    state          TEXT NOT NULL,
    detail         TEXT,
    response_hash  BLOB,
    committed_hash BLOB,
    tx_hash        BLOB,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_state ON payments(state);
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled payment."""

    escrow_id: bytes
    chain_id: int
    escrow: str
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    terms: Terms
    valid_before: int
    payment_header: str
    state: PaymentState
    detail: str | None
    response_hash: bytes | None
    committed_hash: bytes | None
    tx_hash: bytes | None
    created_at: float  # wall time the payment was signed: bounds the search for its delivery on chain


class Journal:
    """The journal file at `path` (a path or sqlite:/// URL); safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self._conn = open_sqlite(path)
        with transaction(self._conn) as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)

    def close(self) -> None:
        self._conn.close()

    def record(
        self,
        *,
        escrow_id: bytes,
        chain_id: int,
        escrow: str,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        terms: Terms,
        valid_before: int,
        payment_header: str,
    ) -> None:
        """Commit a new `signed` payment; durable when this returns."""
        now = time.time()
        with transaction(self._conn) as conn:
            conn.execute(
                "INSERT INTO payments (escrow_id, chain_id, escrow, method, url, headers, body, terms, valid_before,"
                " payment_header, state, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    escrow_id,
                    chain_id,
                    escrow,
                    method,
                    url,
                    json.dumps(headers),
                    body,
                    json.dumps(terms.to_json()),
                    valid_before,
                    payment_header,
                    PaymentState.SIGNED.value,
                    now,
                    now,
                ),
            )

    def update(
        self,
        escrow_id: bytes,
        state: PaymentState,
        *,
        detail: str | None = None,
        response_hash: bytes | None = None,
        committed_hash: bytes | None = None,
        tx_hash: bytes | None = None,
    ) -> None:
        """Move a payment to `state`; the hashes and tx given are kept, the others left as they were."""
        with transaction(self._conn) as conn:
            cursor = conn.execute(
                "UPDATE payments SET state = ?, detail = COALESCE(?, detail),"
                " response_hash = COALESCE(?, response_hash), committed_hash = COALESCE(?, committed_hash),"
                " tx_hash = COALESCE(?, tx_hash), updated_at = ? WHERE escrow_id = ?",
                (state.value, detail, response_hash, committed_hash, tx_hash, time.time(), escrow_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"escrow 0x{escrow_id.hex()} is not in the journal {self.path}")

    def get(self, escrow_id: bytes) -> JournalEntry | None:
        query = f"SELECT {_COLUMNS} FROM payments WHERE escrow_id = ?"  # noqa: S608 - constant column list
        row = self._conn.execute(query, (escrow_id,)).fetchone()
        return None if row is None else _entry(row)

    def entries(self, *, unfinished_only: bool = False) -> list[JournalEntry]:
        if unfinished_only:
            marks = ",".join("?" * len(UNFINISHED))
            query = f"SELECT {_COLUMNS} FROM payments WHERE state IN ({marks}) ORDER BY created_at"  # noqa: S608
            rows = self._conn.execute(query, UNFINISHED).fetchall()
        else:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM payments ORDER BY created_at").fetchall()  # noqa: S608
        return [_entry(row) for row in rows]


_COLUMNS = (
    "escrow_id, chain_id, escrow, method, url, headers, body, terms, valid_before, payment_header, state,"
    " detail, response_hash, committed_hash, tx_hash, created_at"
)


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    (eid, chain_id, escrow, method, url, headers, body, terms, valid_before, header, state, detail, rh, ch, tx, at) = (
        row
    )
    return JournalEntry(
        escrow_id=bytes(eid),
        chain_id=int(chain_id),
        escrow=str(escrow),
        method=str(method),
        url=str(url),
        headers=json.loads(str(headers)),
        body=bytes(body),
        terms=Terms.from_json(json.loads(str(terms))),
        valid_before=int(valid_before),
        payment_header=str(header),
        state=PaymentState(str(state)),
        detail=None if detail is None else str(detail),
        response_hash=None if rh is None else bytes(rh),
        committed_hash=None if ch is None else bytes(ch),
        tx_hash=None if tx is None else bytes(tx),
        created_at=float(at),
    )
