"""The keeper's durable state: indexed events, the checkpoint, block hashes, refund attempts.

Escrow states are derived from the raw events (a deposit with no settlement is
open), so undoing a reorg is deleting the events of the affected blocks and
indexing them again. Events and the checkpoint are written in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from escrow_py.chain.escrow import Delivered, Deposited, EscrowEvent
from escrow_py.chain.tx import SentTx
from escrow_py.storage import open_sqlite, transaction
from escrow_py.terms import Terms

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deposits (
    escrow TEXT NOT NULL, id TEXT NOT NULL, terms TEXT NOT NULL, deadline INTEGER NOT NULL,
    buyer TEXT NOT NULL, seller TEXT NOT NULL, token TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX IF NOT EXISTS deposits_deadline ON deposits (deadline);
CREATE TABLE IF NOT EXISTS settlements (
    escrow TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, tx_hash TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE TABLE IF NOT EXISTS checkpoints (escrow TEXT PRIMARY KEY, block_number INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (number INTEGER PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    tx_hash TEXT PRIMARY KEY, escrow TEXT NOT NULL, ids TEXT NOT NULL, nonce INTEGER NOT NULL,
    raw TEXT NOT NULL, tx TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_status ON attempts (status);
CREATE TABLE IF NOT EXISTS failures (
    escrow TEXT NOT NULL, id TEXT NOT NULL, reason TEXT NOT NULL, retry_at REAL NOT NULL,
    PRIMARY KEY (escrow, id)
);
"""

# Attempt statuses: signed (recorded, maybe broadcast), sent, mined, replaced, dropped.
OPEN_ATTEMPTS = ("signed", "sent")


@dataclass(frozen=True, slots=True)
class OpenEscrow:
    """A deposit with no settlement seen on chain."""

    escrow: str
    id: bytes
    terms: Terms
    in_flight: bool  # a refund attempt covering it is signed or sent
    retry_at: float | None  # set when its last simulation failed


@dataclass(frozen=True, slots=True)
class Attempt:
    tx_hash: bytes
    escrow: str
    ids: tuple[bytes, ...]
    nonce: int
    raw: bytes
    tx: dict[str, object]
    status: str
    created_at: float
    updated_at: float


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _bytes(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


class KeeperStore:
    """SQLite by default; one file, safe for several keeper processes."""

    def __init__(self, database: str) -> None:
        self.conn: sqlite3.Connection = open_sqlite(database)
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # -- indexing --------------------------------------------------------------------------

    def checkpoint(self, escrow: str) -> int | None:
        row = self.conn.execute("SELECT block_number FROM checkpoints WHERE escrow = ?", (escrow,)).fetchone()
        return None if row is None else int(row[0])

    def block_hash(self, number: int) -> bytes | None:
        row = self.conn.execute("SELECT hash FROM blocks WHERE number = ?", (number,)).fetchone()
        return None if row is None else _bytes(row[0])

    def apply(
        self,
        escrow: str,
        *,
        rewind_to: int,
        events: Iterable[EscrowEvent],
        checkpoint: int,
        block_hashes: Sequence[tuple[int, bytes]],
    ) -> None:
        """Undo everything indexed after `rewind_to`, add `events`, move the checkpoint: one transaction."""
        with transaction(self.conn) as conn:
            conn.execute("DELETE FROM deposits WHERE escrow = ? AND block_number > ?", (escrow, rewind_to))
            conn.execute("DELETE FROM settlements WHERE escrow = ? AND block_number > ?", (escrow, rewind_to))
            for event in events:
                at = event.at
                if isinstance(event, Deposited):
                    t = event.terms
                    conn.execute(
                        "INSERT OR REPLACE INTO deposits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (escrow, _hex(event.id), json.dumps(t.to_json()), t.deadline, t.buyer, t.seller, t.token,
                         at.block_number, _hex(at.block_hash)),
                    )  # fmt: skip
                else:
                    kind = "released" if isinstance(event, Delivered) else "refunded"
                    conn.execute(
                        "INSERT OR REPLACE INTO settlements VALUES (?, ?, ?, ?, ?, ?)",
                        (escrow, _hex(event.id), kind, _hex(at.tx_hash), at.block_number, _hex(at.block_hash)),
                    )
            conn.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?)", [(n, _hex(h)) for n, h in block_hashes])
            conn.execute("DELETE FROM blocks WHERE number < ?", (checkpoint - 1_000,))
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (escrow, checkpoint))

    # -- decisions -------------------------------------------------------------------------

    def open_escrows(self, escrow: str, *, deadline_before: int | None = None) -> list[OpenEscrow]:
        """Deposits with no settlement, soonest deadline first."""
        sql = (
            "SELECT d.id, d.terms, f.retry_at FROM deposits d "
            "LEFT JOIN failures f ON f.escrow = d.escrow AND f.id = d.id "
            "WHERE d.escrow = ? AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.escrow = d.escrow AND s.id = d.id)"
        )
        args: list[object] = [escrow]
        if deadline_before is not None:
            sql += " AND d.deadline <= ?"
            args.append(deadline_before)
        sql += " ORDER BY d.deadline"
        in_flight = self.in_flight_ids(escrow)
        return [
            OpenEscrow(escrow, _bytes(row[0]), Terms.from_json(json.loads(row[1])), _bytes(row[0]) in in_flight, row[2])
            for row in self.conn.execute(sql, args)
        ]

    def counts(self, escrow: str) -> dict[str, int]:
        held = self.conn.execute(
            "SELECT COUNT(*) FROM deposits d WHERE d.escrow = ? AND NOT EXISTS "
            "(SELECT 1 FROM settlements s WHERE s.escrow = d.escrow AND s.id = d.id)",
            (escrow,),
        ).fetchone()[0]
        counts = {"held": int(held), "released": 0, "refunded": 0}
        for kind, n in self.conn.execute(
            "SELECT kind, COUNT(*) FROM settlements WHERE escrow = ? GROUP BY kind", (escrow,)
        ):
            counts[kind] = int(n)
        return counts

    # -- refund attempts -------------------------------------------------------------------

    def record_attempt(self, escrow: str, ids: Sequence[bytes], signed: SentTx) -> None:
        """Durable before the transaction is broadcast: status `signed`, with its raw bytes."""
        now = time.time()
        tx_hash, nonce, raw = signed.tx_hash, signed.nonce, signed.raw
        tx_json = json.dumps(
            {k: (_hex(bytes(v)) if isinstance(v, bytes | bytearray) else v) for k, v in signed.tx.items()}
        )
        status = "signed"
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_hex(tx_hash), escrow, json.dumps([_hex(i) for i in ids]), nonce, _hex(raw), tx_json, status, now,
                 now),
            )  # fmt: skip

    def set_attempt_status(self, tx_hash: bytes, status: str) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "UPDATE attempts SET status = ?, updated_at = ? WHERE tx_hash = ?", (status, time.time(), _hex(tx_hash))
            )

    def open_attempts(self, escrow: str) -> list[Attempt]:
        rows = self.conn.execute(
            "SELECT tx_hash, escrow, ids, nonce, raw, tx, status, created_at, updated_at FROM attempts "
            "WHERE escrow = ? AND status IN (?, ?) ORDER BY created_at",
            (escrow, *OPEN_ATTEMPTS),
        )
        attempts = []
        for row in rows:
            tx = json.loads(row[5])
            if isinstance(tx.get("data"), str):
                tx["data"] = _bytes(tx["data"])
            attempts.append(
                Attempt(_bytes(row[0]), row[1], tuple(_bytes(i) for i in json.loads(row[2])), int(row[3]),
                        _bytes(row[4]), tx, row[6], float(row[7]), float(row[8]))
            )  # fmt: skip
        return attempts

    def in_flight_ids(self, escrow: str) -> set[bytes]:
        return {i for attempt in self.open_attempts(escrow) for i in attempt.ids}

    def record_failure(self, escrow: str, escrow_id: bytes, reason: str, retry_at: float) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (escrow, _hex(escrow_id), reason, retry_at)
            )

    def clear_failure(self, escrow: str, escrow_id: bytes) -> None:
        with transaction(self.conn) as conn:
            conn.execute("DELETE FROM failures WHERE escrow = ? AND id = ?", (escrow, _hex(escrow_id)))

    def attempt_counts(self) -> dict[str, int]:
        return {
            status: int(n) for status, n in self.conn.execute("SELECT status, COUNT(*) FROM attempts GROUP BY status")
        }
