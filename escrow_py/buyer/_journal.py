"""The buyer's journal: every signed payment, committed before the payment leaves the process.

One SQLite file (escrow_py.storage discipline: WAL, synchronous=FULL). A row is
enough for a new process to find the escrow on chain and replay the request:
the request itself (the buyer's own data), the terms, the PAYMENT-SIGNATURE
value, and what became of it.

States: `signed` (committed; whether it reached the seller is unknown),
`rejected` (the seller refused it; not deposited when checked), `held`
(deposited, not delivered), `unsettled` (served first: the body matches the seller's hash, and
no money has moved yet; closed by recover() once the chain shows the settlement or the
authorization expires unused), and the final ones `delivered` (body hash verified),
`mismatch` (the body differs from the committed hash), `refunded`, `void`
(never deposited and the authorization expired).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from escrow_py.buyer import _ledger as ledger
from escrow_py.buyer._audit import AuditLog, terms_fields
from escrow_py.buyer._policy import ALLOW, Decision, PaymentContext, Policy
from escrow_py.storage import open_sqlite, transaction
from escrow_py.terms import Terms


class PaymentState(StrEnum):
    SIGNED = "signed"
    REJECTED = "rejected"
    HELD = "held"
    UNSETTLED = "unsettled"  # delivered first (serve-first), settlement not yet seen on chain
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
    """The journal file at `path` (a path or sqlite:/// URL); safe to share between threads.

    It also holds the budget ledger (escrow_py.buyer._ledger), moved in the same
    transactions as the payments, and writes the audit trail: `audit` defaults to
    `<journal>.audit.jsonl` and `<journal>.audit.sqlite` beside the file; False turns it off.
    """

    def __init__(self, path: str | Path, *, audit: AuditLog | bool = True) -> None:
        self.path = path
        self._conn = open_sqlite(path)
        # One connection shared by threads: one transaction at a time on it (BEGIN IMMEDIATE orders processes).
        self._lock = threading.RLock()
        with self._transaction() as conn:
            for statement in filter(str.strip, (_SCHEMA + ";" + ledger.SCHEMA).split(";")):
                conn.execute(statement)
        self.audit: AuditLog | None = AuditLog.beside(path) if audit is True else audit or None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as conn:
            yield conn

    def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(query, args).fetchall())

    def close(self) -> None:
        self._conn.close()
        if self.audit is not None:
            self.audit.close()

    # -- the ledger ----------------------------------------------------------------------------

    def reserve(self, escrow_id: bytes, terms: Terms, ctx: PaymentContext, policy: Policy | None) -> Decision:
        """Decide by the policy and, if allowed, reserve ctx.amount, atomically; the decision is audited."""
        decision = ALLOW if policy is None else policy.check_offer(ctx)
        if decision.allowed:
            now = time.time()
            with self._transaction() as conn:
                if policy is not None:
                    windows = tuple(w.seconds for w in policy.windows)
                    decision = policy.check_budgets(ctx, ledger.usage(conn, ctx, windows, now))
                if decision.allowed:
                    ledger.insert_reservation(conn, escrow_id, ctx, now)
        self.audit_decision(escrow_id, terms, ctx, decision)
        return decision

    def audit_decision(self, escrow_id: bytes, terms: Terms, ctx: PaymentContext, decision: Decision) -> None:
        if self.audit is None:
            return
        fields = {
            **terms_fields(terms),
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason.value,
            "network": ctx.network,
            "escrow": ctx.escrow,
            "host": ctx.host,
            "task": ctx.task,
        }
        if not decision.allowed:
            fields.update(detail=decision.detail, limit=decision.limit, available=decision.available)
        self.audit.write("decision", escrow_id, fields)

    def cancel_reservation(self, escrow_id: bytes) -> None:
        """Release a reservation whose payment was never sent (signing failed)."""
        with self._transaction() as conn:
            ledger.set_status(conn, escrow_id, ledger.LedgerStatus.RELEASED, time.time())

    def ledger_rows(self) -> list[ledger.LedgerRow]:
        with self._lock:
            return ledger.rows(self._conn)

    def release_orphans(self, grace: float = 60.0) -> list[bytes]:
        """Release reservations older than `grace` seconds that never got a journal row (nothing was sent)."""
        with self._transaction() as conn:
            found = ledger.orphans(conn, time.time() - grace)
            for escrow_id in found:
                ledger.set_status(conn, escrow_id, ledger.LedgerStatus.RELEASED, time.time())
        for escrow_id in found:
            if self.audit is not None:
                self.audit.write("ledger", escrow_id, {"ledger": "released", "reason": "never_sent"})
        return found

    def unconfirmed(self) -> list[bytes]:
        with self._lock:
            return ledger.unconfirmed(self._conn)

    def confirm_on_chain(self, escrow_id: bytes, spent: bool) -> None:
        """The chain's final word on a payment: its money went to the seller (spent) or back (released)."""
        status = ledger.LedgerStatus.SPENT if spent else ledger.LedgerStatus.RELEASED
        with self._transaction() as conn:
            ledger.mark_chain_final(conn, escrow_id, status, time.time())
        if self.audit is not None:
            self.audit.write("ledger", escrow_id, {"ledger": status.value, "reason": "chain_final"})

    def record_invalid(self, escrow_id: bytes, problem: str) -> None:
        """A delivered body the caller's validator rejected: noted in the journal and the audit trail."""
        self.update(escrow_id, PaymentState.DELIVERED, detail=f"validation failed: {problem}")
        if self.audit is not None:
            self.audit.write("validation_failed", escrow_id, {"problem": problem})

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
        with self._transaction() as conn:
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
        if self.audit is not None:
            self.audit.write("state", escrow_id, {**terms_fields(terms), "state": PaymentState.SIGNED.value})

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
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE payments SET state = ?, detail = COALESCE(?, detail),"
                " response_hash = COALESCE(?, response_hash), committed_hash = COALESCE(?, committed_hash),"
                " tx_hash = COALESCE(?, tx_hash), updated_at = ? WHERE escrow_id = ?",
                (state.value, detail, response_hash, committed_hash, tx_hash, time.time(), escrow_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"escrow 0x{escrow_id.hex()} is not in the journal {self.path}")
            ledger.follow(conn, escrow_id, state.value, time.time())
            terms = conn.execute("SELECT terms FROM payments WHERE escrow_id = ?", (escrow_id,)).fetchone()[0]
        if self.audit is not None:
            fields = {**terms_fields(Terms.from_json(json.loads(str(terms)))), "state": state.value}
            if tx_hash is not None:
                fields["txHash"] = "0x" + tx_hash.hex()
            self.audit.write("state", escrow_id, fields)

    def record_resend(self, escrow_id: bytes, attempt: int, reason: str, retry_after: int, wait: float) -> None:
        """The same signed payment is about to be sent again after a 503 of the seller's (`reason`): noted in
        the payment's detail (its state stays what it was) and as a `resend` record of the audit trail."""
        detail = f"resend {attempt} after 503 {reason} (Retry-After {retry_after}s, waiting {wait:g}s)"
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE payments SET detail = ?, updated_at = ? WHERE escrow_id = ?", (detail, time.time(), escrow_id)
            )
            if cursor.rowcount != 1:
                raise KeyError(f"escrow 0x{escrow_id.hex()} is not in the journal {self.path}")
        if self.audit is not None:
            fields = {"attempt": attempt, "reason": reason, "retryAfter": retry_after, "wait": wait}
            self.audit.write("resend", escrow_id, fields)

    def get(self, escrow_id: bytes) -> JournalEntry | None:
        query = f"SELECT {_COLUMNS} FROM payments WHERE escrow_id = ?"  # noqa: S608 - constant column list
        rows = self._read(query, (escrow_id,))
        return _entry(rows[0]) if rows else None

    def entries(self, *, unfinished_only: bool = False) -> list[JournalEntry]:
        if unfinished_only:
            marks = ",".join("?" * len(UNFINISHED))
            query = f"SELECT {_COLUMNS} FROM payments WHERE state IN ({marks}) ORDER BY created_at"  # noqa: S608
            rows = self._read(query, UNFINISHED)
        else:
            rows = self._read(f"SELECT {_COLUMNS} FROM payments ORDER BY created_at")  # noqa: S608
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
