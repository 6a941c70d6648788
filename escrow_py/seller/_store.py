"""The seller's durable state: one row per escrow id, the queue of delivery hashes to post, and what
several replicas on one store share (claims and leases, the operator key's nonces and transactions).

A payment row is written before its deposit is sent (status `depositing`), so a
crash anywhere leaves a trace; the handler's response and its pending delivery
are written in one transaction, so a response never leaves without its delivery
queued. The escrow id is the primary key: the same payment can be recorded once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from escrow_py.chain.tx import SentTx, signed_from_raw
from escrow_py.protocol.codec import parse_hex
from escrow_py.protocol.terms import Terms
from escrow_py.storage import Database, Migration, Tx, open_store, run_script

# The two outgoing queues of the store: delivery hashes and serve-first settlements.
_Queue = Literal["deliveries", "settlements"]

NAMESPACE = "seller"  # its PostgreSQL schema

_SCHEMA_1 = """
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
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries (status, deadline)
"""

# Columns added before migrations existed: a store file written by an older version gets them.
_ADDED_COLUMNS = {
    "payments": {"route": "TEXT"},
    "deliveries": {"final": "INTEGER NOT NULL DEFAULT 0", "retry_at": "REAL NOT NULL DEFAULT 0"},
}


def _older_columns(tx: Tx) -> None:
    if tx.engine != "sqlite":
        return  # no PostgreSQL store predates migrations
    for table, columns in _ADDED_COLUMNS.items():
        present = {row[1] for row in tx.all(f"PRAGMA table_info({table})")}
        for name, declaration in columns.items():
            if name not in present:
                tx.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


# Several processes and replicas on one store: leases (a payment's claim, the poster of a key), the
# operator key's shared nonce counter, and every transaction it signs, recorded before broadcast.
_SCHEMA_2 = """
CREATE INDEX IF NOT EXISTS payments_status ON payments (status);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS operator_nonces (
    address TEXT PRIMARY KEY, next_nonce INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_txs (
    tx_hash TEXT PRIMARY KEY, address TEXT NOT NULL, nonce INTEGER NOT NULL, intent TEXT NOT NULL,
    raw TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_txs_intent ON operator_txs (intent, created_at)
"""

# The database's own clock in Unix seconds: the one clock every replica's lease is judged by. The one
# expression the two engines spell differently (SQLite 3.40 has no sub-second unixepoch()).
_DB_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION",
}

_TAKE_LEASE_SQL = (
    "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, NOW + ?) ON CONFLICT (name) DO UPDATE "
    "SET owner = excluded.owner, expires_at = excluded.expires_at "
    "WHERE leases.owner = excluded.owner OR leases.expires_at < NOW RETURNING owner"
)
_TAKE_LEASE = {engine: _TAKE_LEASE_SQL.replace("NOW", now) for engine, now in _DB_NOW.items()}
# Renewal only: a lease its owner no longer holds (taken over, released) is never brought back.
_RENEW_LEASES_SQL = "UPDATE leases SET expires_at = NOW + ? WHERE (name, owner) IN (VALUES PAIRS) RETURNING name, owner"

# Serve-first (DESIGN.md section 8): the buyer's signed authorization is kept with its payment until
# the settlement lands, since the settlement itself is what pulls the money. IF NOT EXISTS: a SQLite
# store the serve-first branch wrote before migrations has these already.
_SCHEMA_3 = """
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
)
"""


def _payload_column(tx: Tx) -> None:
    """payments.payload: the signed EscrowPayload (JSON), kept so a deposit a reorg removed can be sent again."""
    if tx.engine != "sqlite":
        tx.execute("ALTER TABLE payments ADD COLUMN IF NOT EXISTS payload TEXT")
    elif "payload" not in {row[1] for row in tx.all("PRAGMA table_info(payments)")}:
        tx.execute("ALTER TABLE payments ADD COLUMN payload TEXT")


# Schema 4: ids, hashes and raw transactions as bytes (BLOB / BYTEA), as the keeper's and the buyer's stores keep
# them, where schemas 1-3 kept 0x-hex text. Each table is rebuilt as `new_<table>`, its rows copied over with
# their hex decoded, then renamed into place; the indexes are made afresh, with two for the poster's
# follow-up reads (posted or settled, not yet final), which otherwise scan every final row.
_SCHEMA_4 = """
CREATE TABLE new_payments (
    escrow_id BLOB PRIMARY KEY, terms TEXT NOT NULL, deadline INTEGER NOT NULL, status TEXT NOT NULL,
    accepted_at INTEGER NOT NULL,
    deposit_tx BLOB, refund_tx BLOB,
    response_status INTEGER, response_headers TEXT, response_body BLOB,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, route TEXT, payload TEXT
);
CREATE TABLE new_deliveries (
    escrow_id BLOB PRIMARY KEY REFERENCES new_payments (escrow_id), terms TEXT NOT NULL,
    delivery_hash BLOB NOT NULL, deadline INTEGER NOT NULL, status TEXT NOT NULL,
    tx_hash BLOB, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, updated_at REAL NOT NULL,
    final INTEGER NOT NULL DEFAULT 0, retry_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE new_settlements (
    escrow_id BLOB PRIMARY KEY REFERENCES new_payments (escrow_id), buyer TEXT NOT NULL, amount INTEGER NOT NULL,
    payload TEXT NOT NULL, delivery_hash BLOB, due INTEGER NOT NULL, status TEXT NOT NULL,
    tx_hash BLOB, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    final INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL, queued_at REAL
);
CREATE TABLE new_refused_buyers (
    buyer TEXT PRIMARY KEY, escrow_id BLOB NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE new_operator_txs (
    tx_hash BLOB PRIMARY KEY, address TEXT NOT NULL, nonce INTEGER NOT NULL, intent TEXT NOT NULL,
    raw BLOB NOT NULL, created_at REAL NOT NULL
)
"""
_INDEXES_4 = """
CREATE INDEX payments_status ON payments (status);
CREATE INDEX deliveries_status ON deliveries (status, deadline);
CREATE INDEX deliveries_unfinal ON deliveries (status, final, deadline);
CREATE INDEX settlements_status ON settlements (status, due);
CREATE INDEX settlements_unfinal ON settlements (status, final);
CREATE INDEX settlements_buyer ON settlements (buyer, status);
CREATE INDEX operator_txs_intent ON operator_txs (intent, created_at);
CREATE INDEX operator_txs_nonce ON operator_txs (address, nonce)
"""
# Each rebuilt table (parents before children) and its columns that held 0x-hex.
_HEX_COLUMNS = {
    "payments": ("escrow_id", "deposit_tx", "refund_tx"),
    "deliveries": ("escrow_id", "delivery_hash", "tx_hash"),
    "settlements": ("escrow_id", "delivery_hash", "tx_hash"),
    "refused_buyers": ("escrow_id",),
    "operator_txs": ("tx_hash", "raw"),
}


def _ids_as_bytes(tx: Tx) -> None:
    """Schema 4's data move: every row of schemas 1-3 copied into its `new_` table with its hex decoded."""
    for table, hexed in _HEX_COLUMNS.items():
        columns = _columns(tx, f"new_{table}")
        at = [columns.index(c) for c in hexed]
        names = ", ".join(columns)
        rows = tx.all(f"SELECT {names} FROM {table}")  # noqa: S608 - our own table and column names
        if rows:
            tx.executemany(
                f"INSERT INTO new_{table} ({names}) VALUES ({', '.join('?' * len(columns))})",  # noqa: S608
                [
                    tuple(_unhex(v, f"{table}.{columns[i]}") if i in at else v for i, v in enumerate(row))
                    for row in rows
                ],
            )
    for table in reversed(_HEX_COLUMNS):  # children first: their foreign keys name the old parent
        tx.execute(f"DROP TABLE {table}")
    for table in _HEX_COLUMNS:
        tx.execute(f"ALTER TABLE new_{table} RENAME TO {table}")
        if tx.engine == "postgresql":  # the primary key's index keeps the name it was created with
            tx.execute(f"ALTER INDEX new_{table}_pkey RENAME TO {table}_pkey")
    run_script(tx, _INDEXES_4)


def _columns(tx: Tx, table: str) -> list[str]:
    if tx.engine == "sqlite":
        return [str(row[1]) for row in tx.all(f"PRAGMA table_info({table})")]
    rows = tx.all(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = ? ORDER BY ordinal_position",
        (table,),
    )
    return [str(row[0]) for row in rows]


MIGRATIONS = (
    Migration(1, "payments and deliveries", _SCHEMA_1, _older_columns),
    Migration(2, "leases, operator nonces and transactions", _SCHEMA_2),
    Migration(3, "serve-first settlements, refused buyers, payments.payload", _SCHEMA_3, _payload_column),
    Migration(4, "ids, hashes and raw transactions as bytes", _SCHEMA_4, _ids_as_bytes),
)


class PaymentStatus(StrEnum):
    """A payment row's `status` (the values are what the database stores)."""

    DEPOSITING = "depositing"  # recorded, deposit sent or about to be
    HELD = "held"  # deposit confirmed, handler not finished
    SERVED = "served"  # response stored, delivery queued
    REFUNDED = "refunded"  # handler failed, refund confirmed
    REFUND_PENDING = "refund_pending"  # handler failed, refund not (yet) confirmed
    SERVING_FIRST = "serving_first"  # serve-first: verified, exposure reserved, handler not finished
    SERVED_FIRST = "served_first"  # serve-first: response stored, settlement queued (see `settlements`)
    # Serve-first: the handler ran, then the seller's before-settle hook declined to collect. Nothing is
    # stored as the answer and nothing is settled; a replay is refused with the hook's reason.
    DECLINED = "declined"


class SettleStatus(StrEnum):
    """A serve-first settlement's `status`. Unpaid (counted against the exposure limits): serving, queued."""

    SERVING = "serving"  # the handler runs; no hash yet
    QUEUED = "queued"  # response stored, to be settled by the poster
    SETTLED = "settled"  # our settleMany's Settled event names it
    LOST = "lost"  # skipped by settleMany, or its authorization expired unsettled: the seller's loss
    DECLINED = "declined"  # the seller's before-settle hook declined it: never sent, not owed, `reason` says why


UNPAID = (SettleStatus.SERVING, SettleStatus.QUEUED)


class Reserve(StrEnum):
    """What the store said to a serve-first reservation (SellerStore.begin_serve_first; DONE: None there)."""

    DONE = "done"
    KNOWN = "known"  # recorded already, by another request or replica
    LIMIT = "serve_first_limit"  # the buyer's or everyone's unpaid total would pass its limit
    REFUSED = "serve_first_refused"  # this buyer left a settlement unpaid


class DeliveryStatus(StrEnum):
    """A delivery's `status`. Only `posted` means our own transaction delivered it (its Delivered event is in
    our receipt); the others say why it never will be."""

    PENDING = "pending"  # to post; `retry_at` (wall clock) holds it back after a refused payout
    POSTED = "posted"
    EXPIRED = "expired"  # still Held when its deadline passed: the escrow is the buyer's to refund
    SETTLED_ELSEWHERE = "settled"  # found Released by another transaction (another poster, the seller's own key)
    REFUNDED_ON_CHAIN = "refunded"  # found Refunded (an early refund by the seller's side, or a keeper)


def _unhex(value: str | None, field: str) -> bytes | None:
    """A 0x-hex value of schemas 1-3 as bytes (ValueError naming `field` if a row holds anything else)."""
    return None if value is None else parse_hex(value, field)


def _opt(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


@lru_cache(maxsize=4096)
def _terms(text: str) -> Terms:
    """Stored terms, parsed once: the poster reads the same in-flight rows every pass until they are final, and
    parsing checksums four addresses (a keccak each), which cost more than the query itself. Terms is immutable."""
    return Terms.from_json(json.loads(text))


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Payment:
    escrow_id: bytes
    terms: Terms
    status: PaymentStatus
    accepted_at: int  # the chain time the payment was verified at: replays are verified at it again
    deposit_tx: bytes | None
    refund_tx: bytes | None
    response: StoredResponse | None
    payload: str | None = None  # the signed EscrowPayload as JSON text (serve-first: the x402 envelope)
    declined: str | None = None  # status PaymentStatus.DECLINED: the reason the seller's before-settle hook gave

    @property
    def serve_first(self) -> bool:
        return self.status in (PaymentStatus.SERVING_FIRST, PaymentStatus.SERVED_FIRST)


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
    status: DeliveryStatus
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
    status: SettleStatus
    amount: int
    buyer: str
    delivery_hash: bytes | None
    tx_hash: bytes | None
    reason: str | None
    payload: str | None = None  # as QueuedSettlement.payload


@dataclass(frozen=True, slots=True)
class Losses:
    """Serve-first settlements that never paid: how many, how much, and the buyers now refused serve-first."""

    count: int
    amount: int
    refused_buyers: frozenset[str]


class SellerStore:
    """The store on SQLite (a path or sqlite:/// URL) or PostgreSQL (a postgresql:// URL, schema `seller`).

    Every method is thread-safe and durable when it returns. Several processes and hosts may
    share one store: every write that two of them could race is one statement or one transaction
    (a unique key, a conditional update, an upsert), never a read in the process then a write.
    """

    def __init__(self, url: str | Path, *, pool_size: int = 20, namespace: str = NAMESPACE) -> None:
        # `namespace`: the PostgreSQL schema; a facilitator keeps its escrow store in its own (`facilitator`),
        # so a seller and a facilitator given one URL never share these tables.
        self._db: Database = open_store(url, namespace, MIGRATIONS, component="seller", pool_size=pool_size)

    def close(self) -> None:
        self._db.close()

    def payment(self, escrow_id: bytes) -> Payment | None:
        row = self._db.one(
            "SELECT terms, status, accepted_at, deposit_tx, refund_tx, response_status, response_headers, "
            "response_body, payload FROM payments WHERE escrow_id = ?",
            (escrow_id,),
        )
        if row is None:
            return None
        terms, status, accepted_at, deposit_tx, refund_tx, response_status, headers, body, payload = row
        response = None
        if response_status is not None:
            pairs = [_header(k, v) for k, v in json.loads(headers)]
            response = StoredResponse(int(response_status), pairs, bytes(body))
        declined = None
        if status == PaymentStatus.DECLINED:  # rare: the one case that reads the settlement too
            record = self.settlement(escrow_id)
            declined = record.reason if record is not None and record.reason else PaymentStatus.DECLINED
        return Payment(
            escrow_id,
            _terms(terms),
            PaymentStatus(status),
            int(accepted_at),
            _opt(deposit_tx),
            _opt(refund_tx),
            response,
            payload,
            declined,
        )

    def answered(self, escrow_id: bytes) -> bool:
        """Whether a response is stored for the payment (then it is only ever replayed)."""
        row = self._db.one("SELECT 1 FROM payments WHERE escrow_id = ? AND response_status IS NOT NULL", (escrow_id,))
        return row is not None

    def begin_deposit(
        self,
        escrow_id: bytes,
        terms: Terms,
        accepted_at: int,
        route: str | None = None,
        payload: str | None = None,
        *,
        held: bool = False,
    ) -> bool:
        """Record a payment about to be deposited (`held`: found deposited already); False if the id is
        already known (unique key).

        `payload` (the signed EscrowPayload as JSON) lets the poster send the deposit again if a
        reorg removes it after its response was served.
        """
        status = PaymentStatus.HELD if held else PaymentStatus.DEPOSITING
        with self._db.transaction() as tx:
            return _insert_payment(tx, escrow_id, terms, status, accepted_at=accepted_at, route=route,
                                   payload=payload)  # fmt: skip

    def set_deposit_sent(self, escrow_id: bytes, tx_hash: bytes) -> None:
        """The deposit transaction about to leave (or its repriced replacement): found again on a retry."""
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE payments SET deposit_tx = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                (tx_hash, time.time(), escrow_id, PaymentStatus.DEPOSITING),
            )

    def forget(self, escrow_id: bytes) -> None:
        """Drop a payment whose deposit never happened, so the buyer may try again."""
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM payments WHERE escrow_id = ? AND status = ?", (escrow_id, PaymentStatus.DEPOSITING))

    def set_held(self, escrow_id: bytes, deposit_tx: bytes | None) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE payments SET status = ?, deposit_tx = COALESCE(?, deposit_tx), updated_at = ? "
                "WHERE escrow_id = ?",
                (PaymentStatus.HELD, deposit_tx, time.time(), escrow_id),
            )

    def record_held(
        self, escrow_id: bytes, terms: Terms, accepted_at: int, route: str | None, deposit_tx: bytes | None
    ) -> None:
        """A payment deposited by someone else (a facilitator): recorded as held in one write, or an existing
        row (a retry of the same payment) moved to held."""
        with self._db.transaction() as tx:
            if not _insert_payment(
                tx, escrow_id, terms, PaymentStatus.HELD, accepted_at=accepted_at, route=route, payload=None
            ):
                tx.execute(
                    "UPDATE payments SET status = ?, deposit_tx = COALESCE(?, deposit_tx), updated_at = ? "
                    "WHERE escrow_id = ? AND status = ?",
                    (PaymentStatus.HELD, deposit_tx, time.time(), escrow_id, PaymentStatus.DEPOSITING),
                )
            elif deposit_tx is not None:
                tx.execute("UPDATE payments SET deposit_tx = ? WHERE escrow_id = ?", (deposit_tx, escrow_id))

    def save_served(
        self,
        escrow_id: bytes,
        terms: Terms,
        response: StoredResponse,
        delivery_hash: bytes,
        *,
        deposit_tx: bytes | None = None,
        release: tuple[str, str] | None = None,
    ) -> bool:
        """Store the response and queue its delivery hash in one transaction, unless a response is stored.

        A stored response is never overwritten: False means another run's response was there first
        (a replica whose claim lapsed), and that one, whose hash is queued, is the one to answer.
        `deposit_tx` is the confirmed deposit (kept if None); `release` (lease name, owner) gives up
        the payment's claim in the same transaction, and nothing is written (False) unless that owner
        still held it: a run whose claim was taken over never answers, even before the other stores.
        """
        now = time.time()
        with self._db.transaction() as tx:
            if not _release(tx, release):
                return False  # the claim was lost: the run that took it over answers
            stored = tx.execute(
                "UPDATE payments SET status = ?, response_status = ?, response_headers = ?, response_body = ?, "
                "deposit_tx = COALESCE(?, deposit_tx), updated_at = ? WHERE escrow_id = ? AND response_status IS NULL",
                (PaymentStatus.SERVED, response.status, _headers_json(response), response.body, deposit_tx, now,
                 escrow_id),
            ).rowcount  # fmt: skip
            if stored != 1:
                return False
            tx.execute(
                "INSERT INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (escrow_id) DO NOTHING",
                (escrow_id, json.dumps(terms.to_json()), delivery_hash, terms.deadline, DeliveryStatus.PENDING, now),
            )
        return True

    def save_failed(
        self,
        escrow_id: bytes,
        response: StoredResponse,
        refund_tx: bytes | None,
        *,
        deposit_tx: bytes | None = None,
        release: tuple[str, str] | None = None,
    ) -> bool:
        """Store a failed handler's response and its refund; False (nothing written) if a response is stored.

        `deposit_tx` and `release` as in save_served.
        """
        status = PaymentStatus.REFUNDED if refund_tx is not None else PaymentStatus.REFUND_PENDING
        with self._db.transaction() as tx:
            if not _release(tx, release):
                return False  # the claim was lost: the run that took it over answers
            stored = tx.execute(
                "UPDATE payments SET status = ?, refund_tx = ?, response_status = ?, response_headers = ?, "
                "response_body = ?, deposit_tx = COALESCE(?, deposit_tx), updated_at = ? "
                "WHERE escrow_id = ? AND response_status IS NULL",
                (status, refund_tx, response.status, _headers_json(response), response.body, deposit_tx,
                 time.time(), escrow_id),
            ).rowcount  # fmt: skip
        return stored == 1

    def set_refunded(self, escrow_id: bytes, refund_tx: bytes | None) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE payments SET status = ?, refund_tx = COALESCE(?, refund_tx), updated_at = ? "
                "WHERE escrow_id = ?",
                (PaymentStatus.REFUNDED, refund_tx, time.time(), escrow_id),
            )

    def refunds_pending(self) -> list[tuple[bytes, Terms]]:
        rows = self._db.all("SELECT escrow_id, terms FROM payments WHERE status = ?", (PaymentStatus.REFUND_PENDING,))
        return [(bytes(i), _terms(t)) for i, t in rows]

    def pending_deliveries(self, limit: int = 100) -> list[PendingDelivery]:
        """Pending deliveries due now (not held back by `defer`), earliest deadline first."""
        rows = self._db.all(
            "SELECT d.escrow_id, d.terms, d.delivery_hash, p.route, p.deposit_tx, d.attempts FROM deliveries d "
            "LEFT JOIN payments p ON p.escrow_id = d.escrow_id WHERE d.status = ? AND d.retry_at <= ? "
            "ORDER BY d.deadline LIMIT ?",
            (DeliveryStatus.PENDING, time.time(), limit),
        )
        return [PendingDelivery(bytes(i), _terms(t), bytes(h), r, _opt(d), int(n)) for i, t, h, r, d, n in rows]

    def expire_pending(self, chain_time: int) -> list[bytes]:
        """Mark expired every pending delivery whose deadline is at or before `chain_time`, held back or not."""
        with self._db.transaction() as tx:
            rows = tx.execute(
                "SELECT escrow_id FROM deliveries WHERE status = ? AND deadline <= ?",
                (DeliveryStatus.PENDING, chain_time),
            ).fetchall()
            tx.executemany(
                "UPDATE deliveries SET status = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                [(DeliveryStatus.EXPIRED, time.time(), i, DeliveryStatus.PENDING) for (i,) in rows],
            )
        return [bytes(i) for (i,) in rows]

    def defer(self, delays: list[tuple[bytes, float]], error: str) -> None:
        """Keep these deliveries pending, each held back for its delay in seconds; counted as an attempt."""
        now = time.time()
        with self._db.transaction() as tx:
            tx.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, retry_at = ?, updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(error[:500], now + delay, now, i, DeliveryStatus.PENDING) for i, delay in delays],
            )

    def posted_unsettled(self, limit: int = 500) -> list[PostedDelivery]:
        """Posted deliveries not yet `final` (deep enough): a reorg may still take their transaction away."""
        rows = self._db.all(
            "SELECT escrow_id, terms, tx_hash FROM deliveries "
            "WHERE status = ? AND final = 0 AND tx_hash IS NOT NULL ORDER BY deadline LIMIT ?",
            (DeliveryStatus.POSTED, limit),
        )
        return [PostedDelivery(bytes(i), _terms(t), bytes(h)) for i, t, h in rows]

    # `table` is one of two literal names, never input: the f-string below builds no query from data.
    def _final(self, table: _Queue, ids: list[bytes]) -> None:
        """The rows' transaction is deep enough to survive a reorg (`deliveries` or `settlements`)."""
        with self._db.transaction() as tx:
            tx.executemany(
                f"UPDATE {table} SET final = 1, updated_at = ? WHERE escrow_id = ?",  # noqa: S608
                [(time.time(), i) for i in ids],
            )

    def _requeue(
        self, table: _Queue, ids: list[bytes], why: str, *, sent: DeliveryStatus | SettleStatus,
        queued: DeliveryStatus | SettleStatus,
    ) -> None:  # fmt: skip
        """Rows whose transaction a reorg removed go back from `sent` to `queued`, to be sent again."""
        with self._db.transaction() as tx:
            tx.executemany(
                f"UPDATE {table} SET status = ?, tx_hash = NULL, last_error = ?, updated_at = ? "  # noqa: S608
                "WHERE escrow_id = ? AND status = ?",
                [(queued, why[:500], time.time(), i, sent) for i in ids],
            )

    def mark_final(self, ids: list[bytes]) -> None:
        self._final("deliveries", ids)

    def repost(self, ids: list[bytes], why: str) -> None:
        """Back to pending: the transaction that posted them is gone (a reorg); the poster sends them again."""
        self._requeue("deliveries", ids, why, sent=DeliveryStatus.POSTED, queued=DeliveryStatus.PENDING)

    def delivery(self, escrow_id: bytes) -> DeliveryRecord | None:
        row = self._db.one("SELECT status, delivery_hash, tx_hash FROM deliveries WHERE escrow_id = ?", (escrow_id,))
        if row is None:
            return None
        return DeliveryRecord(DeliveryStatus(row[0]), bytes(row[1]), _opt(row[2]))

    def mark_deliveries(
        self,
        ids: list[bytes],
        status: DeliveryStatus,
        tx_hash: bytes | None = None,
        *,
        was: DeliveryStatus = DeliveryStatus.PENDING,
    ) -> None:
        """Move deliveries that are in status `was` to `status` (a row in any other status is left alone)."""
        now = time.time()
        with self._db.transaction() as tx:
            tx.executemany(
                "UPDATE deliveries SET status = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                [(status, tx_hash, now, i, was) for i in ids],
            )

    # -- leases: one replica at a time on a payment, one poster per operator key -------------------------

    def take_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take or renew lease `name` for `owner` until `seconds` from now; False while another owner's holds.

        One statement, so two processes (or hosts) asking at once cannot both get it: the row's
        unique key and the database's row lock decide. A holder that dies stops renewing, and
        the lease is anyone's once it expires. Expiry is judged by the database's clock, so a
        replica whose clock runs fast cannot take a live lease early.
        """
        with self._db.transaction() as tx:
            row = tx.execute(_TAKE_LEASE[tx.engine], (name, owner, seconds)).fetchone()
        return row is not None

    def renew_leases(self, leases: Sequence[tuple[str, str]], seconds: float) -> set[tuple[str, str]]:
        """Extend each lease (name, owner) its owner still holds to `seconds` from now, in one statement; the
        ones renewed. One missing was taken over by another owner (or released): it is not taken back."""
        if not leases:
            return set()
        pairs = ", ".join("(?, ?)" for _ in leases)
        sql = _RENEW_LEASES_SQL.replace("NOW", _DB_NOW[self._db.engine]).replace("PAIRS", pairs)
        rows = self._db.all(sql, (seconds, *(part for lease in leases for part in lease)))
        return {(str(name), str(owner)) for name, owner in rows}

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up at once (only if `owner` still holds it)."""
        with self._db.transaction() as tx:
            _release(tx, (name, owner))

    def lease_holder(self, name: str) -> tuple[str, float] | None:
        """(owner, expires_at in the database's clock, Unix seconds) of lease `name`, unless released."""
        row = self._db.one("SELECT owner, expires_at FROM leases WHERE name = ?", (name,))
        return None if row is None else (str(row[0]), float(row[1]))

    # -- the operator key's nonces and transactions (chain.tx.NonceBook) -------------------------------

    def allocate_nonce(self, address: str, at_least: int) -> int:
        """The key's next nonce (at least `at_least`), counted as taken in the same statement."""
        with self._db.transaction() as tx:
            row = tx.execute(
                "INSERT INTO operator_nonces (address, next_nonce, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (address) DO UPDATE SET next_nonce = CASE "
                "WHEN operator_nonces.next_nonce >= excluded.next_nonce THEN operator_nonces.next_nonce + 1 "
                "ELSE excluded.next_nonce END, updated_at = excluded.updated_at RETURNING next_nonce",
                (address, at_least + 1, time.time()),
            ).fetchone()
        return int(row[0]) - 1

    def give_back_nonce(self, address: str, nonce: int) -> bool:
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE operator_nonces SET next_nonce = ?, updated_at = ? WHERE address = ? AND next_nonce = ?",
                (nonce, time.time(), address, nonce + 1),
            ).rowcount
        return changed == 1

    def lower_nonce(self, address: str, to: int) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE operator_nonces SET next_nonce = ?, updated_at = ? WHERE address = ? AND next_nonce > ?",
                (to, time.time(), address, to),
            )

    def record_tx(self, address: str, signed: SentTx) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO operator_txs (tx_hash, address, nonce, intent, raw, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tx_hash) DO NOTHING",
                (signed.tx_hash, address, signed.nonce, signed.intent, signed.raw, time.time()),
            )

    def txs_for(self, address: str, intent: str) -> list[bytes]:
        rows = self._db.all(
            "SELECT tx_hash FROM operator_txs WHERE intent = ? AND address = ? ORDER BY created_at DESC LIMIT 5",
            (intent, address),
        )
        return [bytes(h) for (h,) in rows]

    def unmined(self, address: str, from_nonce: int, *, intent: str | None = None) -> list[SentTx]:
        """The key's recorded transactions at nonce `from_nonce` or above (of `intent`: its last 5), newest first."""
        sql = "SELECT raw, intent FROM operator_txs WHERE address = ? AND nonce >= ?"
        args: list[object] = [address, from_nonce]
        if intent is not None:
            sql, args = sql + " AND intent = ?", [*args, intent]
        rows = self._db.all(sql + " ORDER BY created_at DESC" + (" LIMIT 5" if intent is not None else ""), args)
        return [signed_from_raw(bytes(raw), str(intent_)) for raw, intent_ in rows]

    def drop_tx(self, address: str, tx_hash: bytes) -> None:
        """Forget a transaction the node refused: it never left, and nobody is to send it later."""
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM operator_txs WHERE tx_hash = ? AND address = ?", (tx_hash, address))

    def note_attempt(self, ids: list[bytes], error: str) -> None:
        now = time.time()
        with self._db.transaction() as tx:
            tx.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE escrow_id = ?",
                [(error[:500], now, i) for i in ids],
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
    ) -> Reserve | None:
        """Reserve exposure for a serve-first payment and record it, atomically; None when done.

        Otherwise why it may not be served first: Reserve.REFUSED (this buyer left a settlement
        unpaid), Reserve.LIMIT (the buyer's or everyone's unpaid total would pass its limit), or
        Reserve.KNOWN (the id is recorded already, by another request or replica).
        `due` is the chain time by which the settlement must have landed (min(validBefore, deadline)).
        Replicas on one PostgreSQL store take one advisory lock for the check and the insert, so two
        of them cannot both fit under a limit only one fits under (SQLite: BEGIN IMMEDIATE does it).
        """
        buyer, amount = terms.buyer, terms.amount
        unpaid = ",".join("?" * len(UNPAID))
        with self._db.transaction() as tx:
            tx.lock("seller.serve_first_exposure")
            if tx.one("SELECT 1 FROM refused_buyers WHERE buyer = ?", (buyer,)) is not None:
                return Reserve.REFUSED
            row = tx.one(
                f"SELECT COALESCE(SUM(CASE WHEN buyer = ? THEN amount END), 0), COALESCE(SUM(amount), 0) "  # noqa: S608
                f"FROM settlements WHERE status IN ({unpaid})",
                (buyer, *UNPAID),
            )
            owed_by_buyer, owed = (0, 0) if row is None else row
            if int(owed_by_buyer) + amount > max_per_buyer or int(owed) + amount > max_total:
                return Reserve.LIMIT
            if not _insert_payment(
                tx, escrow_id, terms, PaymentStatus.SERVING_FIRST, accepted_at=accepted_at, route=route, payload=payload
            ):
                return Reserve.KNOWN
            tx.execute(
                "INSERT INTO settlements (escrow_id, buyer, amount, payload, due, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (escrow_id, buyer, amount, payload, due, SettleStatus.SERVING, time.time()),
            )
        return None

    def save_served_first(
        self,
        escrow_id: bytes,
        response: StoredResponse,
        delivery_hash: bytes,
        *,
        release: tuple[str, str] | None = None,
    ) -> bool:
        """Store the response and queue its settlement in one transaction (before the answer leaves).

        Write-once like save_served: False means another run's response was stored first (a replica
        whose claim lapsed), and that one, whose hash is queued, is the one to answer. `release` as
        in save_served.
        """
        now = time.time()
        with self._db.transaction() as tx:
            if not _release(tx, release):
                return False  # the claim was lost: the run that took it over answers
            stored = tx.execute(
                "UPDATE payments SET status = ?, response_status = ?, response_headers = ?, response_body = ?, "
                "updated_at = ? WHERE escrow_id = ? AND response_status IS NULL",
                (PaymentStatus.SERVED_FIRST, response.status, _headers_json(response), response.body, now, escrow_id),
            ).rowcount
            if stored != 1:
                return False
            tx.execute(
                "UPDATE settlements SET status = ?, delivery_hash = ?, updated_at = ?, queued_at = ? "
                "WHERE escrow_id = ? AND status = ?",
                (SettleStatus.QUEUED, delivery_hash, now, now, escrow_id, SettleStatus.SERVING),
            )
        return True

    def forget_serve_first(self, escrow_id: bytes, *, release: tuple[str, str] | None = None) -> bool:
        """The handler failed: nothing was served and nothing will be settled; the exposure is freed.

        `release` as in save_served: False (nothing deleted) if the claim was taken over meanwhile."""
        with self._db.transaction() as tx:
            if not _release(tx, release):
                return False
            tx.execute("DELETE FROM settlements WHERE escrow_id = ? AND status = ?", (escrow_id, SettleStatus.SERVING))
            tx.execute(
                "DELETE FROM payments WHERE escrow_id = ? AND status = ? AND response_status IS NULL",
                (escrow_id, PaymentStatus.SERVING_FIRST),
            )
        return True

    def decline_serve_first(self, escrow_id: bytes, reason: str, *, release: tuple[str, str] | None = None) -> bool:
        """The seller's before-settle hook declined a served-first payment after its handler ran: recorded
        as declined with `reason` (its exposure freed, nothing queued), in one transaction that also gives
        up the claim. False (nothing written) if another run's response was stored first, or the claim was
        taken over (`release` as in save_served)."""
        now = time.time()
        with self._db.transaction() as tx:
            if not _release(tx, release):
                return False
            declined = tx.execute(
                "UPDATE payments SET status = ?, updated_at = ? WHERE escrow_id = ? AND status = ? "
                "AND response_status IS NULL",
                (PaymentStatus.DECLINED, now, escrow_id, PaymentStatus.SERVING_FIRST),
            ).rowcount
            if declined != 1:
                return False
            tx.execute(
                "UPDATE settlements SET status = ?, reason = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                (SettleStatus.DECLINED, reason[:200], now, escrow_id, SettleStatus.SERVING),
            )
        return True

    def settlement(self, escrow_id: bytes) -> SettlementRecord | None:
        row = self._db.one(
            "SELECT status, amount, buyer, delivery_hash, tx_hash, reason, payload FROM settlements "
            "WHERE escrow_id = ?",
            (escrow_id,),
        )
        if row is None:
            return None
        return SettlementRecord(SettleStatus(row[0]), int(row[1]), row[2], _opt(row[3]), _opt(row[4]), row[5], row[6])

    def settlements_due(self, limit: int = 100) -> list[QueuedSettlement]:
        """Queued settlements, the one due soonest first."""
        rows = self._db.all(
            "SELECT escrow_id, payload, delivery_hash, attempts FROM settlements WHERE status = ? ORDER BY due LIMIT ?",
            (SettleStatus.QUEUED, limit),
        )
        return [QueuedSettlement(bytes(i), p, bytes(h), int(n)) for i, p, h, n in rows]

    def oldest_queued_age(self) -> float | None:
        """Seconds (wall clock) since the longest-waiting queued settlement was queued; None if none is."""
        row = self._db.one("SELECT MIN(queued_at) FROM settlements WHERE status = ?", (SettleStatus.QUEUED,))
        oldest = None if row is None else row[0]
        return None if oldest is None else time.time() - float(oldest)

    def expire_settlements(self, chain_time: int) -> tuple[list[bytes], list[bytes]]:
        """Settlements that can no longer land (due at or before `chain_time`): (queued ones, now lost;
        serving ones, dropped: their handler never finished, so nothing was served)."""
        unpaid = ",".join("?" * len(UNPAID))
        due = f"SELECT 1 FROM settlements WHERE status IN ({unpaid}) AND due <= ? LIMIT 1"  # noqa: S608
        if self._db.one(due, (*UNPAID, chain_time)) is None:
            return [], []  # the usual pass: nothing due, no write transaction
        with self._db.transaction() as tx:
            lost = tx.all(
                "SELECT escrow_id FROM settlements WHERE status = ? AND due <= ?", (SettleStatus.QUEUED, chain_time)
            )
            dropped = tx.all(
                "SELECT escrow_id FROM settlements WHERE status = ? AND due <= ?", (SettleStatus.SERVING, chain_time)
            )
            now = time.time()
            tx.executemany(
                "UPDATE settlements SET status = ?, reason = ?, updated_at = ? WHERE escrow_id = ? AND status = ?",
                [(SettleStatus.LOST, "expired", now, i, SettleStatus.QUEUED) for (i,) in lost],
            )
            for (i,) in dropped:
                tx.execute("DELETE FROM settlements WHERE escrow_id = ? AND status = ?", (i, SettleStatus.SERVING))
                tx.execute("DELETE FROM payments WHERE escrow_id = ? AND status = ?", (i, PaymentStatus.SERVING_FIRST))
        return [bytes(i) for (i,) in lost], [bytes(i) for (i,) in dropped]

    def mark_settled(self, ids: list[bytes], tx_hash: bytes) -> None:
        with self._db.transaction() as tx:
            tx.executemany(
                "UPDATE settlements SET status = ?, tx_hash = ?, final = 0, updated_at = ? WHERE escrow_id = ?",
                [(SettleStatus.SETTLED, tx_hash, time.time(), i) for i in ids],
            )

    def mark_lost(self, escrow_id: bytes, reason: str, *, refuse_buyer: bool, tx_hash: bytes | None = None) -> None:
        """A settlement that will never pay: recorded as a loss; `refuse_buyer` bars the buyer from serve-first."""
        now = time.time()
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE settlements SET status = ?, reason = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ? "
                "WHERE escrow_id = ?",
                (SettleStatus.LOST, reason[:200], tx_hash, now, escrow_id),
            )
            if refuse_buyer:
                tx.execute(
                    "INSERT INTO refused_buyers (buyer, escrow_id, reason, at) "
                    "SELECT buyer, escrow_id, ?, ? FROM settlements WHERE escrow_id = ? "
                    "ON CONFLICT (buyer) DO NOTHING",
                    (reason[:200], now, escrow_id),
                )

    def note_settle_attempt(self, ids: list[bytes], error: str) -> None:
        with self._db.transaction() as tx:
            tx.executemany(
                "UPDATE settlements SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE escrow_id = ?",
                [(error[:500], time.time(), i) for i in ids],
            )

    def settled_unfinal(self, limit: int = 500) -> list[tuple[bytes, bytes]]:
        """(escrow id, settle tx) of settlements not yet deep enough to survive a reorg."""
        rows = self._db.all(
            "SELECT escrow_id, tx_hash FROM settlements WHERE status = ? AND final = 0 LIMIT ?",
            (SettleStatus.SETTLED, limit),
        )
        return [(bytes(i), bytes(t)) for i, t in rows]

    def settle_final(self, ids: list[bytes]) -> None:
        self._final("settlements", ids)

    def resettle(self, ids: list[bytes], why: str) -> None:
        """Back to queued: the settlement's transaction vanished in a reorg and the authorization is unused."""
        self._requeue("settlements", ids, why, sent=SettleStatus.SETTLED, queued=SettleStatus.QUEUED)

    def exposure(self, buyer: str | None = None) -> int:
        """What buyers (or one buyer) owe in serve-first settlements not yet paid."""
        unpaid = ",".join("?" * len(UNPAID))
        query = f"SELECT COALESCE(SUM(amount), 0) FROM settlements WHERE status IN ({unpaid})"  # noqa: S608
        args: tuple[str, ...] = UNPAID
        if buyer is not None:
            query += " AND buyer = ?"
            args = (*UNPAID, buyer)
        row = self._db.one(query, args)
        return 0 if row is None else int(row[0])

    def losses(self) -> Losses:
        with self._db.read() as tx:
            row = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM settlements WHERE status = ?", (SettleStatus.LOST,)
            )
            refused = tx.all("SELECT buyer FROM refused_buyers")
        count, amount = (0, 0) if row is None else row
        return Losses(int(count), int(amount), frozenset(r[0] for r in refused))

    def set_held_again(self, escrow_id: bytes, deposit_tx: bytes) -> None:
        """The deposit sent again after a reorg removed it: the payment keeps its response and status."""
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE payments SET deposit_tx = ?, updated_at = ? WHERE escrow_id = ?",
                (deposit_tx, time.time(), escrow_id),
            )

    def deposit_payload(self, escrow_id: bytes) -> str | None:
        """The signed payload a hold payment was accepted with (None for rows written before it was kept)."""
        row = self._db.one("SELECT payload FROM payments WHERE escrow_id = ?", (escrow_id,))
        return None if row is None else row[0]


def _insert_payment(
    tx: Tx,
    escrow_id: bytes,
    terms: Terms,
    status: PaymentStatus,
    *,
    accepted_at: int,
    route: str | None,
    payload: str | None,
) -> bool:
    """Insert a payment row; False (nothing written) if its id is recorded already."""
    now = time.time()
    inserted = tx.execute(
        "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, created_at, updated_at, route, "
        "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (escrow_id) DO NOTHING",
        (escrow_id, json.dumps(terms.to_json()), terms.deadline, status, accepted_at, now, now, route,
         payload),
    ).rowcount  # fmt: skip
    return inserted == 1


def _release(tx: Tx, lease: tuple[str, str] | None) -> bool:
    """Give up a lease (name, owner) inside the caller's transaction; False if `owner` no longer held it.

    A save that answers a payment calls this first and writes nothing on False: its claim was taken
    over (its holder stalled past the lease), so another run owns the payment now. The delete locks
    the lease row, so a takeover racing this save waits for it and then finds the payment answered.
    """
    if lease is None:
        return True
    return tx.execute("DELETE FROM leases WHERE name = ? AND owner = ?", lease).rowcount == 1


def _headers_json(response: StoredResponse) -> str:
    return json.dumps([[k.hex(), v.hex()] for k, v in response.headers])


def _header(name: str, value: str) -> tuple[bytes, bytes]:
    """A stored response header (its name and value kept as bare hex, see _headers_json)."""
    return parse_hex(f"0x{name}", "stored response header name"), parse_hex(f"0x{value}", "stored response header")


# Retention (`x402-escrow prune --role seller`): what a payment leaves once it is settled for good.
def _quoted(*statuses: StrEnum) -> str:
    return ", ".join(f"'{status}'" for status in statuses)


_FINISHED = _quoted(DeliveryStatus.EXPIRED, DeliveryStatus.SETTLED_ELSEWHERE, DeliveryStatus.REFUNDED_ON_CHAIN)
_DONE_DELIVERY = f"(status IN ({_FINISHED}) OR (status = '{DeliveryStatus.POSTED}' AND final = 1))"
_ANSWERED = _quoted(PaymentStatus.SERVED, PaymentStatus.REFUNDED, PaymentStatus.SERVED_FIRST, PaymentStatus.DECLINED)
_DONE_PAYMENT = f"status IN ({_ANSWERED})"


def prune(db: Database, *, before: float) -> dict[str, int]:
    """Delete what no replay, poster pass or audit of losses needs any more, for escrows whose deadline is before
    `before` (Unix seconds): deliveries posted and final (or expired, or settled or refunded elsewhere), settlements
    paid and final or declined by the seller, then the payments left with neither (a replay of one would be refused
    as expired anyway), and transaction records and lapsed leases older than `before`.

    Kept: anything unfinished (a delivery pending or not yet final, a refund pending, a settlement unpaid or not
    final), lost settlements and the buyers refused for them (what `losses()` reports), and the nonce counters.
    """
    with db.transaction() as tx:
        deliveries = tx.execute(f"DELETE FROM deliveries WHERE deadline < ? AND {_DONE_DELIVERY}", (before,))  # noqa: S608
        settlements = tx.execute(
            "DELETE FROM settlements WHERE due < ? AND ((status = ? AND final = 1) OR status = ?)",
            (before, SettleStatus.SETTLED, SettleStatus.DECLINED),
        )
        payments = tx.execute(
            f"DELETE FROM payments WHERE deadline < ? AND {_DONE_PAYMENT} "  # noqa: S608 - constants
            "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.escrow_id = payments.escrow_id) "
            "AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.escrow_id = payments.escrow_id)",
            (before,),
        )
        txs = tx.execute("DELETE FROM operator_txs WHERE created_at < ?", (before,))
        leases = tx.execute("DELETE FROM leases WHERE expires_at < ?", (before,))
        return {
            "payments": payments.rowcount,
            "deliveries": deliveries.rowcount,
            "settlements": settlements.rowcount,
            "operator_txs": txs.rowcount,
            "leases": leases.rowcount,
        }
