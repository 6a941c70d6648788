"""The buyer's journal: every signed payment, committed before the payment leaves the process.

One SQLite file (escrow_py.storage discipline: WAL, synchronous=FULL), or one
PostgreSQL database (schema `buyer`) that a fleet of agents shares, and with it one
budget. A row is
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from escrow_py.buyer import _ledger as ledger
from escrow_py.buyer._audit import AuditLog, terms_fields
from escrow_py.buyer._policy import ALLOW, Decision, PaymentContext, Policy
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms
from escrow_py.storage import Database, Migration, Tx, open_store


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
# The unfinished states as SQL constants: a partial index's condition, and the query's, spelled the same.
_UNFINISHED_SQL = f"state IN ({', '.join(repr(s) for s in UNFINISHED)})"

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
CREATE INDEX IF NOT EXISTS payments_state ON payments(state)
"""

# Schema 2: the escrow's deadline as a column (retention prunes by it) and an index per query a loop runs.
_SCHEMA_2 = f"""
ALTER TABLE payments ADD COLUMN deadline INTEGER;
DROP INDEX payments_state;
CREATE INDEX payments_state ON payments (state, created_at);
CREATE INDEX payments_deadline ON payments (deadline, state);
CREATE INDEX payments_unfinished ON payments (created_at) WHERE {_UNFINISHED_SQL}
"""


def _fill_deadlines(tx: Tx) -> None:
    rows = tx.all("SELECT escrow_id, terms FROM payments")
    tx.executemany("UPDATE payments SET deadline = ? WHERE escrow_id = ?",
                   [(int(json.loads(str(t))["deadline"]), bytes(i)) for i, t in rows])  # fmt: skip


def _schema_2(tx: Tx) -> None:
    _fill_deadlines(tx)
    ledger.fill_totals(tx)


MIGRATIONS = (
    Migration(1, "payments and ledger", _SCHEMA + ";" + ledger.SCHEMA),
    Migration(2, "deadlines, running totals, indexes", _SCHEMA_2 + ";" + ledger.TOTALS, run=_schema_2),
    Migration(3, "a covering index of the committed rows for the budget windows", ledger.COMMITTED),
    Migration(4, "committed amounts per hour for the budget windows", ledger.HOURS, run=ledger.fill_hours),
)
FINAL = tuple(s.value for s in PaymentState if s.final)


@dataclass(frozen=True, slots=True)
class PaymentRow:
    """What a new payment's journal row holds, written once when it is signed: enough to replay it."""

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


@dataclass(frozen=True, slots=True)
class Replay:
    """The request a payment is for, as a replay sends it again: empty for the SDK plugin (the SDK never
    shows it the request, so recover() can refund or void such a payment, not fetch its bytes again)."""

    method: str = ""
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class JournalEntry(PaymentRow):
    """One journaled payment: its row as signed, and what became of it."""

    state: PaymentState
    detail: str | None
    response_hash: bytes | None
    committed_hash: bytes | None
    tx_hash: bytes | None
    created_at: float  # wall time the payment was signed: bounds the search for its delivery on chain


class Journal:
    """The journal at `path` (a path, sqlite:/// URL or postgresql:// URL); safe to share between threads.

    It also holds the budget ledger (escrow_py.buyer._ledger), moved in the same
    transactions as the payments, and writes the audit trail: `audit` defaults to
    `<journal>.audit.jsonl` and `<journal>.audit.sqlite` beside a journal file (the journal's
    own database for PostgreSQL); False turns it off.
    """

    def __init__(self, path: str | Path, *, audit: AuditLog | bool = True) -> None:
        self.path = path
        self.db = open_store(path, "buyer", MIGRATIONS)
        self.audit: AuditLog | None = AuditLog.beside(path) if audit is True else audit or None

    def close(self) -> None:
        self.db.close()
        if self.audit is not None:
            self.audit.close()

    # -- the ledger ----------------------------------------------------------------------------

    def reserve(self, escrow_id: bytes, terms: Terms, ctx: PaymentContext, policy: Policy | None) -> Decision:
        """Reserve ctx.amount if the policy's budgets allow it, atomically with the budget check; the decision
        is audited. Only the budgets are decided here (they need what the ledger holds, under its lock): the
        offer rules were decided before (escrow_py.buyer._decide), and are not run again."""
        with self.db.transaction() as tx:
            decision = _reserve(tx, escrow_id, ctx, policy, time.time())
        self.audit_decision(escrow_id, terms, ctx, decision)
        return decision

    def reserve_and_record(
        self,
        escrow_id: bytes,
        terms: Terms,
        ctx: PaymentContext,
        policy: Policy | None,
        sign: Callable[[], PaymentRow],
    ) -> Decision:
        """`reserve` and `record` in one transaction: if the policy's budgets allow it, reserve ctx.amount, then
        call `sign()` (the budget still locked, so nothing is signed unless the budgets allowed the payment),
        which signs and returns the new payment's row (record's keyword arguments), and commit both; durable
        when this returns. One commit and one audit write (the decision, then the `signed` state) instead of
        two each. As in `reserve`, only the budgets are decided here.

        Denied: nothing is signed or written but the decision's audit record. If `sign()` or the row fails, or
        the process dies before the commit, nothing was reserved or recorded (the transaction is rolled back)
        and no signature left the process.
        """
        row: PaymentRow | None = None
        now = time.time()
        with self.db.transaction() as tx:
            decision = _reserve(tx, escrow_id, ctx, policy, now)
            if decision.allowed:
                row = sign()
                _insert_payment(tx, now, row)
        if self.audit is not None:
            records: list[tuple[str, bytes | None, dict[str, Any]]] = [
                ("decision", escrow_id, _decision_fields(terms, ctx, decision))
            ]
            if row is not None:
                records.append(("state", escrow_id, {**terms_fields(terms), "state": PaymentState.SIGNED.value}))
            self.audit.write_many(records)
        return decision

    def audit_decision(self, escrow_id: bytes, terms: Terms, ctx: PaymentContext, decision: Decision) -> None:
        if self.audit is not None:
            self.audit.write("decision", escrow_id, _decision_fields(terms, ctx, decision))

    def ledger_rows(self) -> list[ledger.LedgerRow]:
        with self.db.read() as tx:
            return ledger.rows(tx)

    def release_orphans(self, grace: float = 60.0) -> list[bytes]:
        """Release reservations older than `grace` seconds that never got a journal row (nothing was sent)."""
        with self.db.transaction() as tx:
            found = ledger.orphans(tx, time.time() - grace)
            for escrow_id in found:
                ledger.set_status(tx, escrow_id, ledger.LedgerStatus.RELEASED, time.time())
        for escrow_id in found:
            if self.audit is not None:
                self.audit.write("ledger", escrow_id, {"ledger": "released", "reason": Reason.NEVER_SENT})
        return found

    def unconfirmed(self) -> list[bytes]:
        with self.db.read() as tx:
            return ledger.unconfirmed(tx)

    def confirm_on_chain(self, escrow_id: bytes, spent: bool) -> None:
        """The chain's final word on a payment: its money went to the seller (spent) or back (released)."""
        status = ledger.LedgerStatus.SPENT if spent else ledger.LedgerStatus.RELEASED
        with self.db.transaction() as tx:
            ledger.mark_chain_final(tx, escrow_id, status, time.time())
        if self.audit is not None:
            self.audit.write("ledger", escrow_id, {"ledger": status.value, "reason": Reason.CHAIN_FINAL})

    def record_invalid(self, escrow_id: bytes, problem: str) -> None:
        """A delivered body the caller's validator rejected: noted in the payment's detail and the audit trail.

        Its state stays what the judge made it: a served-first body is still `unsettled` (no money has moved;
        recover() closes it by the chain, spent or void), not `delivered`.
        """
        self._set_detail(escrow_id, f"validation failed: {problem}")
        if self.audit is not None:
            self.audit.write("validation_failed", escrow_id, {"problem": problem})

    def record(self, row: PaymentRow) -> None:
        """Commit a new `signed` payment; durable when this returns."""
        with self.db.transaction() as tx:
            _insert_payment(tx, time.time(), row)
        if self.audit is not None:
            self.audit.write("state", row.escrow_id, {**terms_fields(row.terms), "state": PaymentState.SIGNED.value})

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
        with self.db.transaction() as tx:
            cursor = tx.execute(
                "UPDATE payments SET state = ?, detail = COALESCE(?, detail),"
                " response_hash = COALESCE(?, response_hash), committed_hash = COALESCE(?, committed_hash),"
                " tx_hash = COALESCE(?, tx_hash), updated_at = ? WHERE escrow_id = ?",
                (state.value, detail, response_hash, committed_hash, tx_hash, time.time(), escrow_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"escrow 0x{escrow_id.hex()} is not in the journal {self.path}")
            ledger.follow(tx, escrow_id, state.value, time.time())
            (terms,) = tx.one("SELECT terms FROM payments WHERE escrow_id = ?", (escrow_id,)) or ("",)
        if self.audit is not None:
            fields = {**terms_fields(Terms.from_json(json.loads(str(terms)))), "state": state.value}
            if tx_hash is not None:
                fields["txHash"] = "0x" + tx_hash.hex()
            self.audit.write("state", escrow_id, fields)

    def record_resend(self, escrow_id: bytes, attempt: int, reason: str, retry_after: int, wait: float) -> None:
        """The same signed payment is about to be sent again after a 503 of the seller's (`reason`): noted in
        the payment's detail (its state stays what it was) and as a `resend` record of the audit trail."""
        self._set_detail(
            escrow_id, f"resend {attempt} after 503 {reason} (Retry-After {retry_after}s, waiting {wait:g}s)"
        )
        if self.audit is not None:
            fields = {"attempt": attempt, "reason": reason, "retryAfter": retry_after, "wait": wait}
            self.audit.write("resend", escrow_id, fields)

    def _set_detail(self, escrow_id: bytes, detail: str) -> None:
        """Replace a payment's detail, its state left as it is."""
        with self.db.transaction() as tx:
            cursor = tx.execute(
                "UPDATE payments SET detail = ?, updated_at = ? WHERE escrow_id = ?", (detail, time.time(), escrow_id)
            )
            if cursor.rowcount != 1:
                raise KeyError(f"escrow 0x{escrow_id.hex()} is not in the journal {self.path}")

    def get(self, escrow_id: bytes) -> JournalEntry | None:
        query = f"SELECT {_COLUMNS} FROM payments WHERE escrow_id = ?"  # noqa: S608 - constant column list
        rows = self.db.all(query, (escrow_id,))
        return _entry(rows[0]) if rows else None

    def entries(self, *, unfinished_only: bool = False) -> list[JournalEntry]:
        if unfinished_only:
            # Spelled as the partial index's condition (constants, not parameters), so both engines use it.
            query = f"SELECT {_COLUMNS} FROM payments WHERE {_UNFINISHED_SQL} ORDER BY created_at"  # noqa: S608
            rows = self.db.all(query)
        else:
            rows = self.db.all(f"SELECT {_COLUMNS} FROM payments ORDER BY created_at")  # noqa: S608
        return [_entry(row) for row in rows]


def _reserve(tx: Tx, escrow_id: bytes, ctx: PaymentContext, policy: Policy | None, now: float) -> Decision:
    """The budgets' decision under the token's budget lock, and on allow the reservation (in `tx`)."""
    decision = ALLOW
    ledger.lock_budget(tx, ctx.token)
    if policy is not None:
        windows = tuple(w.seconds for w in policy.windows)
        decision = policy.check_budgets(ctx, ledger.usage(tx, ctx, windows, now))
    if decision.allowed:
        ledger.insert_reservation(tx, escrow_id, ctx, now)
    return decision


def _decision_fields(terms: Terms, ctx: PaymentContext, decision: Decision) -> dict[str, Any]:
    """A `decision` audit record's fields."""
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
    return fields


def _insert_payment(tx: Tx, now: float, row: PaymentRow) -> None:
    """A new `signed` payment's row."""
    tx.execute(
        "INSERT INTO payments (escrow_id, chain_id, escrow, method, url, headers, body, terms, valid_before,"
        " payment_header, state, created_at, updated_at, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            row.escrow_id, row.chain_id, row.escrow, row.method, row.url, json.dumps(row.headers), row.body,
            json.dumps(row.terms.to_json()), row.valid_before, row.payment_header, PaymentState.SIGNED.value,
            now, now, row.terms.deadline,
        ),
    )  # fmt: skip


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


def prune(db: Database, *, before: float) -> dict[str, int]:
    """Forget finished payments whose escrow deadline is before `before` (seconds): journal rows in a final state
    whose ledger row the chain has confirmed (chain_final), with that ledger row, and released reservations that
    never got a journal row, made before it. Unfinished payments (what recover() works on) and unconfirmed ledger
    rows stay; the budget totals stay (they are running sums, not recounted from rows).

    A windowed budget counts the rows of its window: `before` must lie behind the longest budget window.
    """
    final = ", ".join("?" * len(FINAL))
    with db.transaction() as tx:
        gone = tx.all(
            f"SELECT p.escrow_id FROM payments p JOIN ledger l ON l.escrow_id = p.escrow_id WHERE p.deadline < ? "  # noqa: S608
            f"AND p.state IN ({final}) AND l.chain_final = 1",
            (before, *FINAL),
        )
        ids = [(bytes(r[0]),) for r in gone]
        tx.executemany("DELETE FROM payments WHERE escrow_id = ?", ids)
        tx.executemany("DELETE FROM ledger WHERE escrow_id = ?", ids)
        orphans = tx.execute(
            "DELETE FROM ledger WHERE status = 'released' AND reserved_at < ? AND NOT EXISTS "
            "(SELECT 1 FROM payments p WHERE p.escrow_id = ledger.escrow_id)",
            (before,),
        ).rowcount
    return {"payments": len(ids), "ledger": len(ids) + orphans}
