"""The seller's durable state: one row per escrow id, and the queue of delivery hashes to post.

A payment row is written before its deposit is sent (status `depositing`), so a
crash anywhere leaves a trace; the handler's response and its pending delivery
are written in one transaction, so a response never leaves without its delivery
queued. The escrow id is the primary key: the same payment can be recorded once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from escrow_py.chain.tx import SentTx
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
CREATE INDEX IF NOT EXISTS payments_status ON payments (status);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_nonces (
    address TEXT PRIMARY KEY, next_nonce INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_txs (
    tx_hash TEXT PRIMARY KEY, address TEXT NOT NULL, nonce INTEGER NOT NULL, intent TEXT NOT NULL,
    raw TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_txs_intent ON operator_txs (intent, created_at);
"""

# Columns added since the first schema: a store file written by an older version gets them on open.
_ADDED_COLUMNS = {
    "payments": {"route": "TEXT"},
    "deliveries": {"final": "INTEGER NOT NULL DEFAULT 0", "retry_at": "REAL NOT NULL DEFAULT 0"},
}

# Payment statuses.
DEPOSITING = "depositing"  # recorded, deposit sent or about to be
HELD = "held"  # deposit confirmed, handler not finished
SERVED = "served"  # response stored, delivery queued
REFUNDED = "refunded"  # handler failed, refund confirmed
REFUND_PENDING = "refund_pending"  # handler failed, refund not (yet) confirmed

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


class SellerStore:
    """SQLite store (one file); every method is thread-safe and durable when it returns."""

    def __init__(self, path: str | Path) -> None:
        self._conn = open_sqlite(path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)
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
                "response_body FROM payments WHERE escrow_id = ?",
                (_hex(escrow_id),),
            ).fetchone()
        if row is None:
            return None
        terms, status, accepted_at, deposit_tx, refund_tx, response_status, headers, body = row
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
        )

    def answered(self, escrow_id: bytes) -> bool:
        """Whether a response is stored for the payment (then it is only ever replayed)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM payments WHERE escrow_id = ? AND response_status IS NOT NULL", (_hex(escrow_id),)
            ).fetchone()
        return row is not None

    def begin_deposit(self, escrow_id: bytes, terms: Terms, accepted_at: int, route: str | None = None) -> bool:
        """Record a payment about to be deposited; False if the id is already known (unique key)."""
        now = time.time()
        with self._lock, transaction(self._conn):
            inserted = self._conn.execute(
                "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, created_at, "
                "updated_at, route) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (escrow_id) DO NOTHING",
                (_hex(escrow_id), json.dumps(terms.to_json()), terms.deadline, DEPOSITING, accepted_at, now, now,
                 route),
            ).rowcount  # fmt: skip
        return inserted == 1

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

    def save_served(self, escrow_id: bytes, terms: Terms, response: StoredResponse, delivery_hash: bytes) -> bool:
        """Store the response and queue its delivery hash in one transaction, unless a response is stored.

        A stored response is never overwritten: False means another run's response was there first
        (a replica whose claim lapsed), and that one, whose hash is queued, is the one to answer.
        """
        now = time.time()
        with self._lock, transaction(self._conn):
            stored = self._conn.execute(
                "UPDATE payments SET status = ?, response_status = ?, response_headers = ?, response_body = ?, "
                "updated_at = ? WHERE escrow_id = ? AND response_status IS NULL",
                (SERVED, response.status, _headers_json(response), response.body, now, _hex(escrow_id)),
            ).rowcount
            if stored != 1:
                return False
            self._conn.execute(
                "INSERT INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (escrow_id) DO NOTHING",
                (_hex(escrow_id), json.dumps(terms.to_json()), _hex(delivery_hash), terms.deadline, PENDING, now),
            )
        return True

    def save_failed(self, escrow_id: bytes, response: StoredResponse, refund_tx: bytes | None) -> bool:
        """Store a failed handler's response and its refund; False (nothing written) if a response is stored."""
        status = REFUNDED if refund_tx is not None else REFUND_PENDING
        with self._lock, transaction(self._conn):
            stored = self._conn.execute(
                "UPDATE payments SET status = ?, refund_tx = ?, response_status = ?, response_headers = ?, "
                "response_body = ?, updated_at = ? WHERE escrow_id = ? AND response_status IS NULL",
                (status, _hex(refund_tx), response.status, _headers_json(response), response.body, time.time(),
                 _hex(escrow_id)),
            ).rowcount  # fmt: skip
        return stored == 1

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

    # -- leases: one replica at a time on a payment, one poster per operator key -------------------------

    def take_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take or renew lease `name` for `owner` until `seconds` from now; False while another owner's holds.

        One statement, so two processes (or hosts) asking at once cannot both get it: the row's
        unique key and the database's row lock decide. A holder that dies stops renewing, and
        the lease is anyone's once it expires.
        """
        now = time.time()
        with self._lock, transaction(self._conn):
            row = self._conn.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                "SET owner = excluded.owner, expires_at = excluded.expires_at "
                "WHERE leases.owner = excluded.owner OR leases.expires_at < ? RETURNING owner",
                (name, owner, now + seconds, now),
            ).fetchone()
        return row is not None

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up at once (only if `owner` still holds it)."""
        with self._lock, transaction(self._conn):
            self._conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def lease_holder(self, name: str) -> tuple[str, float] | None:
        """(owner, expires_at wall-clock seconds) of lease `name`, if anyone took it and it is not released."""
        with self._lock:
            row = self._conn.execute("SELECT owner, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    # -- the operator key's nonces and transactions (chain.tx.NonceBook) -------------------------------

    def allocate_nonce(self, address: str, at_least: int) -> int:
        """The key's next nonce (at least `at_least`), counted as taken in the same statement."""
        with self._lock, transaction(self._conn):
            row = self._conn.execute(
                "INSERT INTO operator_nonces (address, next_nonce, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (address) DO UPDATE SET next_nonce = CASE "
                "WHEN operator_nonces.next_nonce >= excluded.next_nonce THEN operator_nonces.next_nonce + 1 "
                "ELSE excluded.next_nonce END, updated_at = excluded.updated_at RETURNING next_nonce",
                (address, at_least + 1, time.time()),
            ).fetchone()
        return int(row[0]) - 1

    def give_back_nonce(self, address: str, nonce: int) -> bool:
        with self._lock, transaction(self._conn):
            changed = self._conn.execute(
                "UPDATE operator_nonces SET next_nonce = ?, updated_at = ? WHERE address = ? AND next_nonce = ?",
                (nonce, time.time(), address, nonce + 1),
            ).rowcount
        return changed == 1

    def lower_nonce(self, address: str, to: int) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "UPDATE operator_nonces SET next_nonce = ?, updated_at = ? WHERE address = ? AND next_nonce > ?",
                (to, time.time(), address, to),
            )

    def record_tx(self, address: str, signed: SentTx) -> None:
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO operator_txs (tx_hash, address, nonce, intent, raw, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tx_hash) DO NOTHING",
                (_hex(signed.tx_hash), address, signed.nonce, signed.intent, _hex(signed.raw), time.time()),
            )

    def txs_for(self, address: str, intent: str) -> list[bytes]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT tx_hash FROM operator_txs WHERE intent = ? AND address = ? ORDER BY created_at DESC",
                (intent, address),
            ).fetchall()
        return [bytes.fromhex(h[2:]) for (h,) in rows]

    def note_attempt(self, ids: list[bytes], error: str) -> None:
        now = time.time()
        with self._lock, transaction(self._conn):
            self._conn.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE escrow_id = ?",
                [(error[:500], now, _hex(i)) for i in ids],
            )


def _headers_json(response: StoredResponse) -> str:
    return json.dumps([[k.hex(), v.hex()] for k, v in response.headers])
