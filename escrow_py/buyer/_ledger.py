"""The budget ledger: amounts reserved before signing, spent on delivery, released on refund or void.

It lives in the journal's SQLite file and every change happens inside the journal's
transactions (BEGIN IMMEDIATE takes the database's write lock), so a reservation
checks the budgets and inserts itself atomically across threads and processes, and
a payment's ledger row moves in the same transaction as its journal state. The
available budget is always the budget minus what is reserved minus what is spent.

    reserved ──delivered, mismatch, released on chain──► spent
        │  └──refunded, void, never sent───────────────► released
    (a serve-first payment stays reserved while `unsettled`: delivered once the chain shows its
    settlement, void once its authorization expired unused)
    spent ──refunded on chain after all (the seller never posted)──► released
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum

from escrow_py.buyer._policy import PaymentContext, Usage

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    escrow_id   BLOB PRIMARY KEY,
    task        TEXT NOT NULL,
    seller      TEXT NOT NULL,
    token       TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    status      TEXT NOT NULL,
    reserved_at REAL NOT NULL,
    settled_at  REAL,
    chain_final INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ledger_token_status ON ledger(token, status)
"""


class LedgerStatus(StrEnum):
    RESERVED = "reserved"
    SPENT = "spent"
    RELEASED = "released"


# What a journal state (PaymentState's value) means for the money: gone to the seller, back with the
# buyer, or (absent) not known yet.
_FOLLOWS = {
    "delivered": LedgerStatus.SPENT,
    "mismatch": LedgerStatus.SPENT,
    "refunded": LedgerStatus.RELEASED,
    "void": LedgerStatus.RELEASED,
}


@dataclass(frozen=True, slots=True)
class LedgerRow:
    escrow_id: bytes
    task: str
    seller: str
    token: str
    amount: int
    status: LedgerStatus
    reserved_at: float


def usage(conn: sqlite3.Connection, ctx: PaymentContext, windows: tuple[int, ...], now: float) -> Usage:
    """What is committed (reserved + spent) in ctx's token: overall, for its task, its seller, each window."""
    committed = "token = ? AND status IN ('reserved', 'spent')"

    def total(extra: str = "", *args: object) -> int:
        query = f"SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE {committed}{extra}"  # noqa: S608 - constants
        return int(conn.execute(query, (ctx.token, *args)).fetchone()[0])

    return Usage(
        total=total(),
        task=total(" AND task = ?", ctx.task),
        seller=total(" AND seller = ?", ctx.seller),
        windows={seconds: total(" AND reserved_at >= ?", now - seconds) for seconds in windows},
    )


def insert_reservation(conn: sqlite3.Connection, escrow_id: bytes, ctx: PaymentContext, now: float) -> None:
    conn.execute(
        "INSERT INTO ledger (escrow_id, task, seller, token, amount, status, reserved_at) VALUES (?,?,?,?,?,?,?)",
        (escrow_id, ctx.task, ctx.seller, ctx.token, ctx.amount, LedgerStatus.RESERVED.value, now),
    )


def set_status(conn: sqlite3.Connection, escrow_id: bytes, status: LedgerStatus, now: float) -> None:
    conn.execute(
        "UPDATE ledger SET status = ?, settled_at = ? WHERE escrow_id = ? AND status != ?",
        (status.value, now, escrow_id, status.value),
    )


def follow(conn: sqlite3.Connection, escrow_id: bytes, state: str, now: float) -> None:
    """Move the ledger row the way a journal state says the money went (no-op for unfinished states)."""
    if (status := _FOLLOWS.get(state)) is not None:
        set_status(conn, escrow_id, status, now)


def mark_chain_final(conn: sqlite3.Connection, escrow_id: bytes, status: LedgerStatus, now: float) -> None:
    """The chain has the last word (Released: spent; Refunded or never deposited: released); never revisited."""
    conn.execute(
        "UPDATE ledger SET status = ?, settled_at = COALESCE(settled_at, ?), chain_final = 1 WHERE escrow_id = ?",
        (status.value, now, escrow_id),
    )


def unconfirmed(conn: sqlite3.Connection) -> list[bytes]:
    """Rows whose journal state is final but whose chain outcome has not been confirmed yet."""
    found = conn.execute(
        "SELECT l.escrow_id FROM ledger l JOIN payments p ON p.escrow_id = l.escrow_id"
        " WHERE l.chain_final = 0 AND p.state IN ('delivered', 'mismatch', 'refunded', 'void')"
    ).fetchall()
    return [bytes(row[0]) for row in found]


def orphans(conn: sqlite3.Connection, older_than: float) -> list[bytes]:
    """Reservations with no journal row, made before `older_than`: signed (or not) but never sent."""
    rows = conn.execute(
        "SELECT l.escrow_id FROM ledger l LEFT JOIN payments p ON p.escrow_id = l.escrow_id"
        " WHERE l.status = 'reserved' AND p.escrow_id IS NULL AND l.reserved_at < ?",
        (older_than,),
    ).fetchall()
    return [bytes(row[0]) for row in rows]


def rows(conn: sqlite3.Connection) -> list[LedgerRow]:
    found = conn.execute(
        "SELECT escrow_id, task, seller, token, amount, status, reserved_at FROM ledger ORDER BY reserved_at"
    ).fetchall()
    return [
        LedgerRow(bytes(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), LedgerStatus(str(r[5])), float(r[6]))
        for r in found
    ]
