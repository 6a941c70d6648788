"""The seller's durable state: one row per escrow id, and the queue of delivery hashes to post.

A payment row is written before its deposit is sent (status `depositing`), so a
crash anywhere leaves a trace; the handler's response and its pending delivery
are written in one transaction, so a response never leaves without its delivery
queued. The escrow id is the primary key: the same payment can be recorded once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from escrow_py.storage import open_sqlite, transaction
from escrow_py.terms import Terms

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    escrow_id TEXT PRIMARY KEY, terms TEXT NOT NULL, deadline INTEGER NOT NULL, status TEXT NOT NULL,
    accepted_at INTEGER NOT NULL,
    deposit_tx TEXT, refund_tx TEXT,
    response_status INTEGER, response_headers TEXT, response_body BLOB,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, route TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    escrow_id TEXT PRIMARY KEY REFERENCES payments (escrow_id), terms TEXT NOT NULL,
    delivery_hash TEXT NOT NULL, deadline INTEGER NOT NULL, status TEXT NOT NULL,
    tx_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, updated_at REAL NOT NULL,
    final INTEGER NOT NULL DEFAULT 0, retry_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries (status, deadline);
"""

# Serve-first (DESIGN.md section 8): the buyer's signed authorization is kept with its payment until
# the settlement lands, since the settlement itself is what pulls the money.
_SERVE_FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS settlements (
    escrow_id TEXT PRIMARY KEY REFERENCES payments (escrow_id), buyer TEXT NOT NULL, amount INTEGER NOT NULL,
    payload TEXT NOT NULL, delivery_hash TEXT, due INTEGER NOT NULL, status TEXT NOT NULL,
    tx_hash TEXT, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    final INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL, queued_at REAL
);
CREATE INDEX IF NOT EXISTS settlements_status ON settlements (status, due);
CREATE INDEX IF NOT EXISTS settlements_buyer ON settlements (buyer, status);
CREATE TABLE IF NOT EXISTS refused_buyers (
    buyer TEXT PRIMARY KEY, escrow_id TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
"""

# Columns added since the first schema: a store file written by an older version gets them on open.
_ADDED_COLUMNS = {
    # payload: the signed EscrowPayload (JSON), kept so a deposit a reorg removed can be sent again.
    "payments": {"route": "TEXT", "payload": "TEXT"},
    "deliveries": {"final": "INTEGER NOT NULL DEFAULT 0", "retry_at": "REAL NOT NULL DEFAULT 0"},
}

# Payment statuses.
DEPOSITING = "depositing"  # recorded, deposit sent or about to be
HELD = "held"  # deposit confirmed, handler not finished
SERVED = "served"  # response stored, delivery queued
REFUNDED = "refunded"  # handler failed, refund confirmed
REFUND_PENDING = "refund_pending"  # handler failed, refund not (yet) confirmed
SERVING_FIRST = "serving_first"  # serve-first: verified, exposure reserved, handler not finished
SERVED_FIRST = "served_first"  # serve-first: response stored, settlement queued (see `settlements`)

# Settlement statuses (serve-first). Unpaid (counted against the exposure limits): serving, queued.
SETTLE_SERVING = "serving"  # the handler runs; no hash yet
SETTLE_QUEUED = "queued"  # response stored, to be settled by the poster
SETTLE_DONE = "settled"  # our settleMany's Settled event names it
SETTLE_LOST = "lost"  # skipped by settleMany, or its authorization expired unsettled: the seller's loss
UNPAID = (SETTLE_SERVING, SETTLE_QUEUED)

# Delivery statuses. Only `posted` means our own transaction delivered it (its Delivered event
# is in our receipt); the others say why it never will be.
PENDING = "pending"  # to post; `retry_at` (wall clock) holds it back after a refused payout
POSTED = "posted"
EXPIRED = "expired"  # still Held when its deadline passed: the escrow is the buyer's to refund
SETTLED_ELSEWHERE = "settled"  # found Released by another transaction (another poster, the seller's own key)
REFUNDED_ON_CHAIN = "refunded"  # found Refunded (an early refund by the seller's side, or a keeper)


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


def _unhex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value[2:])


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Payment:
    escrow_id: bytes
    terms: Terms
    status: str
    accepted_at: int  # the chain time the payment was verified at: replays are verified at it again
    deposit_tx: bytes | None
    refund_tx: bytes | None
    response: StoredResponse | None
    payload: str | None = None  # the signed EscrowPayload as JSON text

    @property
    def serve_first(self) -> bool:
        return self.status in (SERVING_FIRST, SERVED_FIRST)


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    escrow_id: bytes
    terms: Terms
    delivery_hash: bytes
    route: str | None = None  # "GET /report/{item}": the priced route it was sold on
    deposit_tx: bytes | None = None
    attempts: int = 0  # transactions that tried and did not deliver it


@dataclass(frozen=True, slots=True)
class PostedDelivery:
    """A delivery whose transaction was mined, followed until it is deep enough to survive reorgs."""

    escrow_id: bytes
    terms: Terms
    tx_hash: bytes


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    status: str
    delivery_hash: bytes
    tx_hash: bytes | None


@dataclass(frozen=True, slots=True)
class QueuedSettlement:
    """A served serve-first payment to settle: its signed payload (EscrowPayload JSON) and delivery hash."""

    escrow_id: bytes
    payload: str
    delivery_hash: bytes
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class SettlementRecord:
    status: str
    amount: int
    buyer: str
    delivery_hash: bytes | None
    tx_hash: bytes | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Losses:
    """Serve-first settlements that never paid: how many, how much, and the buyers now refused serve-first."""

    count: int
    amount: int
    refused_buyers: frozenset[str]


class SellerStore:
    """SQLite store (one file); every method is thread-safe and durable when it returns."""

    def __init__(self, path: str | Path) -> None:
        self._conn = open_sqlite(path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA + _SERVE_FIRST_SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns.items():
                    if name not in present:
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def payment(self, escrow_id: bytes) -> Payment | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT terms, status, accepted_at, deposit_tx, refund_tx, response_status, response_headers, "
                "response_body, payload FROM payments WHERE escrow_id = ?",
                (_hex(escrow_id),),
            ).fetchone()
        if row is None:
            return None
        terms, status, accepted_at, deposit_tx, refund_tx, response_status, headers, body, payload = row
        response = None
        if response_status is not None:
            pairs = [(bytes.fromhex(k), bytes.fromhex(v)) for k, v in json.loads(headers)]
            response = StoredResponse(int(response_status), pairs, bytes(body))
        return Payment(
            escrow_id,
            Terms.from_json(json.loads(terms)),
            status,
            int(accepted_at),
            _unhex(deposit_tx),
            _unhex(refund_tx),
            response,
            payload,
        )

    def begin_deposit(
        self, escrow_id: bytes, terms: Terms, accepted_at: int, route: str | None = None, payload: str | None = None
    ) -> bool:
        """Record a payment about to be deposited; False if the id is already known (unique key).

        `payload` (the signed EscrowPayload as JSON) lets the poster send the deposit again if a
        reorg removes it after its response was served.
        """
        with self._lock:
            try:
                with transaction(self._conn):
                    self._insert_payment(
                        escrow_id, terms, DEPOSITING, accepted_at=accepted_at, route=route, payload=payload
                    )
            except sqlite3.IntegrityError:
                return False
        return True

    def _insert_payment(
        self, escrow_id: bytes, terms: Terms, status: str, *, accepted_at: int, route: str | None, payload: str | None
    ) -> None:
        now = time.time()
        self._conn.execute(
            "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, created_at, updated_at, route, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_hex(escrow_id), json.dumps(terms.to_json()), terms.deadline, status, accepted_at, now, now, route,
             payload),
        )  # fmt: skip

    def set_deposit_sent(self, escrow_id: bytes, tx_hash: bytes) -> None:
        """The deposit transaction about to leave (or its repriced replacement): found again on a retry."""
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET deposit_tx = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                (_hex(tx_hash), time.time(), _hex(escrow_id), DEPOSITING),
            )

    def forget(self, escrow_id: bytes) -> None:
        """Drop a payment whose deposit never happened, so the buyer may try again."""
        with self._lock, transaction(self._conn):
            self._conn.execute("DELETE FROM payments WHERE escrow_id = ? AND status = ?", (_hex(escrow_id), DEPOSITING))

    def set_held(self, escrow_id: bytes, deposit_tx: bytes | None) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET status = ?, deposit_tx = COALESCE(?, deposit_tx), updated_at = ? "
                "WHERE escrow_id = ?",
                (HELD, _hex(deposit_tx), time.time(), _hex(escrow_id)),
            )

    def save_served(self, escrow_id: bytes, terms: Terms, response: StoredResponse, delivery_hash: bytes) -> None:
        """Store the response and queue its delivery hash in one transaction."""
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET status = ?, response_status = ?, response_headers = ?, response_body = ?, "
                "updated_at = ? WHERE escrow_id = ?",
                (SERVED, response.status, _headers_json(response), response.body, now, _hex(escrow_id)),
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_hex(escrow_id), json.dumps(terms.to_json()), _hex(delivery_hash), terms.deadline, PENDING, now),
            )

    def save_failed(self, escrow_id: bytes, response: StoredResponse, refund_tx: bytes | None) -> None:
        status = REFUNDED if refund_tx is not None else REFUND_PENDING
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET status = ?, refund_tx = ?, response_status = ?, response_headers = ?, "
                "response_body = ?, updated_at = ? WHERE escrow_id = ?",
                (status, _hex(refund_tx), response.status, _headers_json(response), response.body, time.time(),
                 _hex(escrow_id)),
            )  # fmt: skip

    def set_refunded(self, escrow_id: bytes, refund_tx: bytes | None) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET status = ?, refund_tx = COALESCE(?, refund_tx), updated_at = ? "
                "WHERE escrow_id = ?",
                (REFUNDED, _hex(refund_tx), time.time(), _hex(escrow_id)),
            )

    def refunds_pending(self) -> list[tuple[bytes, Terms]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT escrow_id, terms FROM payments WHERE status = ?", (REFUND_PENDING,)
            ).fetchall()
        return [(bytes.fromhex(i[2:]), Terms.from_json(json.loads(t))) for i, t in rows]

    def pending_deliveries(self, limit: int = 100) -> list[PendingDelivery]:
        """Pending deliveries due now (not held back by `defer`), earliest deadline first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT d.escrow_id, d.terms, d.delivery_hash, p.route, p.deposit_tx, d.attempts FROM deliveries d "
                "LEFT JOIN payments p ON p.escrow_id = d.escrow_id WHERE d.status = ? AND d.retry_at <= ? "
                "ORDER BY d.deadline LIMIT ?",
                (PENDING, time.time(), limit),
            ).fetchall()
        return [
            PendingDelivery(
                bytes.fromhex(i[2:]), Terms.from_json(json.loads(t)), bytes.fromhex(h[2:]), r, _unhex(d), int(n)
            )
            for i, t, h, r, d, n in rows
        ]

    def expire_pending(self, chain_time: int) -> list[bytes]:
        """Mark expired every pending delivery whose deadline is at or before `chain_time`, held back or not."""
        with self._lock, transaction(self._conn):
            rows = self._conn.execute(
                "SELECT escrow_id FROM deliveries WHERE status = ? AND deadline <= ?", (PENDING, chain_time)
            ).fetchall()
            self._conn.executemany(
                "UPDATE deliveries SET status = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                [(EXPIRED, time.time(), i, PENDING) for (i,) in rows],
            )
        return [bytes.fromhex(i[2:]) for (i,) in rows]

    def defer(self, delays: list[tuple[bytes, float]], error: str) -> None:
        """Keep these deliveries pending, each held back for its delay in seconds; counted as an attempt."""
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, retry_at = ?, updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(error[:500], now + delay, now, _hex(i), PENDING) for i, delay in delays],
            )

    def posted_unsettled(self, limit: int = 500) -> list[PostedDelivery]:
        """Posted deliveries not yet `final` (deep enough): a reorg may still take their transaction away."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT escrow_id, terms, tx_hash FROM deliveries "
                "WHERE status = ? AND final = 0 AND tx_hash IS NOT NULL ORDER BY deadline LIMIT ?",
                (POSTED, limit),
            ).fetchall()
        return [
            PostedDelivery(bytes.fromhex(i[2:]), Terms.from_json(json.loads(t)), bytes.fromhex(h[2:]))
            for i, t, h in rows
        ]

    def mark_final(self, ids: list[bytes]) -> None:
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET final = 1, updated_at = ? WHERE escrow_id = ?",
                [(time.time(), _hex(i)) for i in ids],
            )

    def repost(self, ids: list[bytes], why: str) -> None:
        """Back to pending: the transaction that posted them is gone (a reorg); the poster sends them again."""
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET status = ?, tx_hash = NULL, last_error = ?, updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(PENDING, why[:500], time.time(), _hex(i), POSTED) for i in ids],
            )

    def delivery(self, escrow_id: bytes) -> DeliveryRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT status, delivery_hash, tx_hash FROM deliveries WHERE escrow_id = ?", (_hex(escrow_id),)
            ).fetchone()
        if row is None:
            return None
        return DeliveryRecord(row[0], bytes.fromhex(row[1][2:]), _unhex(row[2]))

    def mark_deliveries(
        self, ids: list[bytes], status: str, tx_hash: bytes | None = None, *, was: str = PENDING
    ) -> None:
        """Move deliveries that are in status `was` to `status` (a row in any other status is left alone)."""
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET status = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(status, _hex(tx_hash), now, _hex(i), was) for i in ids],
            )

    def note_attempt(self, ids: list[bytes], error: str) -> None:
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE escrow_id = ?",
                [(error[:500], now, _hex(i)) for i in ids],
            )

    # -- serve-first ---------------------------------------------------------------------------

    def begin_serve_first(
        self,
        escrow_id: bytes,
        terms: Terms,
        *,
        accepted_at: int,
        route: str | None,
        payload: str,
        due: int,
        max_per_buyer: int,
        max_total: int,
    ) -> str | None:
        """Reserve exposure for a serve-first payment and record it, atomically; None when done.

        Otherwise the reason it may not be served first: `serve_first_refused` (this buyer left a
        settlement unpaid), `serve_first_limit` (the buyer's or everyone's unpaid total would pass
        its limit), or `known` (the id is recorded already, by another request or replica).
        `due` is the chain time by which the settlement must have landed (min(validBefore, deadline)).
        """
        buyer, amount = terms.buyer, terms.amount
        unpaid = ",".join("?" * len(UNPAID))
        with self._lock:
            try:
                with transaction(self._conn):
                    if self._conn.execute("SELECT 1 FROM refused_buyers WHERE buyer = ?", (buyer,)).fetchone():
                        return "serve_first_refused"
                    owed_by_buyer, owed = self._conn.execute(
                        f"SELECT COALESCE(SUM(CASE WHEN buyer = ? THEN amount END), 0), COALESCE(SUM(amount), 0) "  # noqa: S608
                        f"FROM settlements WHERE status IN ({unpaid})",
                        (buyer, *UNPAID),
                    ).fetchone()
                    if int(owed_by_buyer) + amount > max_per_buyer or int(owed) + amount > max_total:
                        return "serve_first_limit"
                    self._insert_payment(
                        escrow_id, terms, SERVING_FIRST, accepted_at=accepted_at, route=route, payload=payload
                    )
                    self._conn.execute(
                        "INSERT INTO settlements (escrow_id, buyer, amount, payload, due, status, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (_hex(escrow_id), buyer, amount, payload, due, SETTLE_SERVING, time.time()),
                    )
            except sqlite3.IntegrityError:
                return "known"
        return None

    def save_served_first(self, escrow_id: bytes, response: StoredResponse, delivery_hash: bytes) -> None:
        """Store the response and queue its settlement in one transaction (before the answer leaves)."""
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET status = ?, response_status = ?, response_headers = ?, response_body = ?, "
                "updated_at = ? WHERE escrow_id = ?",
                (SERVED_FIRST, response.status, _headers_json(response), response.body, now, _hex(escrow_id)),
            )
            self._conn.execute(
                "UPDATE settlements SET status = ?, delivery_hash = ?, updated_at = ?, queued_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                (SETTLE_QUEUED, _hex(delivery_hash), now, now, _hex(escrow_id), SETTLE_SERVING),
            )

    def forget_serve_first(self, escrow_id: bytes) -> None:
        """The handler failed: nothing was served and nothing will be settled; the exposure is freed."""
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "DELETE FROM settlements WHERE escrow_id = ? AND status = ?", (_hex(escrow_id), SETTLE_SERVING)
            )
            self._conn.execute(
                "DELETE FROM payments WHERE escrow_id = ? AND status = ?", (_hex(escrow_id), SERVING_FIRST)
            )

    def settlement(self, escrow_id: bytes) -> SettlementRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT status, amount, buyer, delivery_hash, tx_hash, reason FROM settlements WHERE escrow_id = ?",
                (_hex(escrow_id),),
            ).fetchone()
        if row is None:
            return None
        return SettlementRecord(row[0], int(row[1]), row[2], _unhex(row[3]), _unhex(row[4]), row[5])

    def settlements_due(self, limit: int = 100) -> list[QueuedSettlement]:
        """Queued settlements, the one due soonest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT escrow_id, payload, delivery_hash, attempts FROM settlements WHERE status = ? "
                "ORDER BY due LIMIT ?",
                (SETTLE_QUEUED, limit),
            ).fetchall()
        return [QueuedSettlement(bytes.fromhex(i[2:]), p, bytes.fromhex(h[2:]), int(n)) for i, p, h, n in rows]

    def oldest_queued_age(self) -> float | None:
        """Seconds (wall clock) since the longest-waiting queued settlement was queued; None if none is."""
        with self._lock:
            (oldest,) = self._conn.execute(
                "SELECT MIN(queued_at) FROM settlements WHERE status = ?", (SETTLE_QUEUED,)
            ).fetchone()
        return None if oldest is None else time.time() - float(oldest)

    def expire_settlements(self, chain_time: int) -> tuple[list[bytes], list[bytes]]:
        """Settlements that can no longer land (due at or before `chain_time`): (queued ones, now lost;
        serving ones, dropped: their handler never finished, so nothing was served)."""
        unpaid = ",".join("?" * len(UNPAID))
        due = f"SELECT 1 FROM settlements WHERE status IN ({unpaid}) AND due <= ? LIMIT 1"  # noqa: S608
        with self._lock:
            if self._conn.execute(due, (*UNPAID, chain_time)).fetchone() is None:
                return [], []  # the usual pass: nothing due, no write transaction
        with self._lock, transaction(self._conn):
            lost = self._conn.execute(
                "SELECT escrow_id FROM settlements WHERE status = ? AND due <= ?", (SETTLE_QUEUED, chain_time)
            ).fetchall()
            dropped = self._conn.execute(
                "SELECT escrow_id FROM settlements WHERE status = ? AND due <= ?", (SETTLE_SERVING, chain_time)
            ).fetchall()
            now = time.time()
            self._conn.executemany(
                "UPDATE settlements SET status = ?, reason = ?, updated_at = ? WHERE escrow_id = ?",
                [(SETTLE_LOST, "expired", now, i) for (i,) in lost],
            )
            for (i,) in dropped:
                self._conn.execute("DELETE FROM settlements WHERE escrow_id = ?", (i,))
                self._conn.execute("DELETE FROM payments WHERE escrow_id = ? AND status = ?", (i, SERVING_FIRST))
        return [bytes.fromhex(i[2:]) for (i,) in lost], [bytes.fromhex(i[2:]) for (i,) in dropped]

    def mark_settled(self, ids: list[bytes], tx_hash: bytes) -> None:
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE settlements SET status = ?, tx_hash = ?, final = 0, updated_at = ? WHERE escrow_id = ?",
                [(SETTLE_DONE, _hex(tx_hash), time.time(), _hex(i)) for i in ids],
            )

    def mark_lost(self, escrow_id: bytes, reason: str, *, refuse_buyer: bool, tx_hash: bytes | None = None) -> None:
        """A settlement that will never pay: recorded as a loss; `refuse_buyer` bars the buyer from serve-first."""
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE settlements SET status = ?, reason = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ? "
                "WHERE escrow_id = ?",
                (SETTLE_LOST, reason[:200], _hex(tx_hash), now, _hex(escrow_id)),
            )
            if refuse_buyer:
                self._conn.execute(
                    "INSERT OR IGNORE INTO refused_buyers (buyer, escrow_id, reason, at) "
                    "SELECT buyer, escrow_id, ?, ? FROM settlements WHERE escrow_id = ?",
                    (reason[:200], now, _hex(escrow_id)),
                )

    def note_settle_attempt(self, ids: list[bytes], error: str) -> None:
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE settlements SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE escrow_id = ?",
                [(error[:500], time.time(), _hex(i)) for i in ids],
            )

    def settled_unfinal(self, limit: int = 500) -> list[tuple[bytes, bytes]]:
        """(escrow id, settle tx) of settlements not yet deep enough to survive a reorg."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT escrow_id, tx_hash FROM settlements WHERE status = ? AND final = 0 LIMIT ?",
                (SETTLE_DONE, limit),
            ).fetchall()
        return [(bytes.fromhex(i[2:]), bytes.fromhex(t[2:])) for i, t in rows]

    def settle_final(self, ids: list[bytes]) -> None:
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE settlements SET final = 1, updated_at = ? WHERE escrow_id = ?",
                [(time.time(), _hex(i)) for i in ids],
            )

    def resettle(self, ids: list[bytes], why: str) -> None:
        """Back to queued: the settlement's transaction vanished in a reorg and the authorization is unused."""
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE settlements SET status = ?, tx_hash = NULL, last_error = ?, updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(SETTLE_QUEUED, why[:500], time.time(), _hex(i), SETTLE_DONE) for i in ids],
            )

    def exposure(self, buyer: str | None = None) -> int:
        """What buyers (or one buyer) owe in serve-first settlements not yet paid."""
        unpaid = ",".join("?" * len(UNPAID))
        query = f"SELECT COALESCE(SUM(amount), 0) FROM settlements WHERE status IN ({unpaid})"  # noqa: S608
        args: tuple[str, ...] = UNPAID
        if buyer is not None:
            query += " AND buyer = ?"
            args = (*UNPAID, buyer)
        with self._lock:
            return int(self._conn.execute(query, args).fetchone()[0])

    def losses(self) -> Losses:
        with self._lock:
            count, amount = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM settlements WHERE status = ?", (SETTLE_LOST,)
            ).fetchone()
            refused = self._conn.execute("SELECT buyer FROM refused_buyers").fetchall()
        return Losses(int(count), int(amount), frozenset(r[0] for r in refused))

    def set_held_again(self, escrow_id: bytes, deposit_tx: bytes) -> None:
        """The deposit sent again after a reorg removed it: the payment keeps its response and status."""
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE payments SET deposit_tx = ?, updated_at = ? WHERE escrow_id = ?",
                (_hex(deposit_tx), time.time(), _hex(escrow_id)),
            )

    def deposit_payload(self, escrow_id: bytes) -> str | None:
        """The signed payload a hold payment was accepted with (None for rows written before it was kept)."""
        with self._lock:
            row = self._conn.execute("SELECT payload FROM payments WHERE escrow_id = ?", (_hex(escrow_id),)).fetchone()
        return None if row is None else row[0]


def _headers_json(response: StoredResponse) -> str:
    return json.dumps([[k.hex(), v.hex()] for k, v in response.headers])
