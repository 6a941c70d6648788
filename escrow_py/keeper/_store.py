"""The keeper's durable state: indexed events, checkpoints, block hashes, refund attempts, troubles.

Escrow states are derived from the raw events: a deposit with no settlement is
open. Undoing a reorg is deleting the events of the blocks that changed and
indexing them again; events and the checkpoint are written in one transaction.

What keeps a long-running keeper's cost flat as history grows:
- each deposit keeps the ABI encoding of its terms as emitted (256 bytes), so a
  refund batch is a concatenation, never a re-parse or re-encode;
- an `open` flag with a partial index: the due-escrow query reads open rows only;
- (escrow, block_number) indexes for the reorg delete;
- running totals of released and refunded escrows instead of counting history.

Refund attempts belong to the signer that made them: a keeper follows up and
replaces only its own transactions, so several keepers can share one database.

A refund payout the token refuses (a blacklisted buyer: `PayoutFailed` in a receipt, or an
escrow still Held that a simulated refundMany does not refund) backs off per (token, buyer),
in `backoffs`: every escrow of that buyer in that token waits until `retry_at`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import decode, encode

from escrow_py.chain.tx import SentTx
from escrow_py.errors import ConfigError
from escrow_py.storage import open_sqlite, transaction
from escrow_py.terms import Terms

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deposits (
    escrow TEXT NOT NULL, id TEXT NOT NULL,
    terms BLOB NOT NULL,
    deadline INTEGER NOT NULL, buyer TEXT NOT NULL, seller TEXT NOT NULL, token TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    open INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX IF NOT EXISTS deposits_by_block ON deposits (escrow, block_number);
CREATE INDEX IF NOT EXISTS deposits_open ON deposits (escrow, deadline) WHERE open = 1;
CREATE TABLE IF NOT EXISTS settlements (
    escrow TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, tx_hash TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX IF NOT EXISTS settlements_by_block ON settlements (escrow, block_number);
CREATE TABLE IF NOT EXISTS totals (escrow TEXT NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL,
                                   PRIMARY KEY (escrow, kind));
CREATE TABLE IF NOT EXISTS checkpoints (escrow TEXT PRIMARY KEY, block_number INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (number INTEGER PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    tx_hash TEXT PRIMARY KEY, signer TEXT NOT NULL, escrow TEXT NOT NULL, ids TEXT NOT NULL,
    nonce INTEGER NOT NULL, raw TEXT NOT NULL, tx TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    block_number INTEGER, block_hash TEXT, refunded INTEGER, gas_used INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_by_signer ON attempts (signer, status);
CREATE TABLE IF NOT EXISTS troubles (
    escrow TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
    retry_at REAL, grp TEXT, since REAL NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX IF NOT EXISTS troubles_by_kind ON troubles (escrow, kind);
CREATE TABLE IF NOT EXISTS reverted_sets (
    fingerprint TEXT PRIMARY KEY, escrow TEXT NOT NULL, tx_hash TEXT NOT NULL, size INTEGER NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS backoffs (
    escrow TEXT NOT NULL, token TEXT NOT NULL, buyer TEXT NOT NULL, failures INTEGER NOT NULL,
    retry_at REAL NOT NULL, reason TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (escrow, token, buyer)
);
"""

# Attempt statuses. Tracked (followed up every new block): signed (recorded, maybe broadcast), sent (the node
# took it), replaced (a fee-bumped copy with the same nonce exists; either may be mined), mined and reverted
# (receipt seen, not yet `reorg_depth` deep). Terminal: final, dropped (its nonce went to another
# transaction), rejected (the node refused it for good).
PENDING = ("signed", "sent", "replaced")
TRACKED = (*PENDING, "mined", "reverted")
# Escrows of these attempts are not sent again: the transaction may still land, or has landed and the
# index has not caught up.
IN_FLIGHT = (*PENDING, "mined")

# Trouble kinds: `simulation` (the refund reverts in eth_call; retried at `retry_at`), `suspect` (in a batch
# that reverted when mined; sent only with its group `grp` until the culprit is isolated), `quarantined`
# (its refund reverted when mined on its own: never sent again).
SIMULATION, SUSPECT, QUARANTINED = "simulation", "suspect", "quarantined"

_TRACKED_SQL = (
    "SELECT tx_hash, signer, escrow, nonce, status, created_at, updated_at, block_number, block_hash, "  # noqa: S608 - marks
    f"refunded, gas_used FROM attempts WHERE status IN ({', '.join('?' * len(TRACKED))})"
)

_TERMS_TYPES = ("address", "address", "address", "address", "uint256", "uint64", "bytes32", "bytes32")


def encode_terms(terms: Terms) -> bytes:
    """The ABI encoding of the Terms tuple: the 256 bytes an entry of refundMany's calldata is made of."""
    return encode(list(_TERMS_TYPES), list(terms.as_tuple()))


def decode_terms(encoded: bytes) -> Terms:
    return Terms(*decode(list(_TERMS_TYPES), encoded))


@dataclass(frozen=True, slots=True)
class OpenEscrow:
    """A deposit with no settlement seen on chain, as the keeper decides about it.

    Addresses are lower-case hex (cheap to compare); `encoded` is the ABI encoding of the terms.
    """

    escrow: str
    id: bytes
    encoded: bytes
    deadline: int
    buyer: str
    seller: str
    token: str
    in_flight: bool = False  # one of this keeper's refund transactions covers it
    retry_at: float | None = None  # its refund last failed in simulation; wall time of the next try
    quarantined: str | None = None  # why its refund is never sent again
    group: str | None = None  # suspect group: sent only together with the rest of the group
    backoff_until: float | None = None  # the token refused its buyer's payout; wall time of the next try

    @property
    def terms(self) -> Terms:
        return decode_terms(self.encoded)

    @classmethod
    def of(cls, escrow: str, escrow_id: bytes, terms: Terms, **flags: Any) -> OpenEscrow:
        return cls(escrow, escrow_id, encode_terms(terms), terms.deadline, terms.buyer.lower(),
                   terms.seller.lower(), terms.token.lower(), **flags)  # fmt: skip


@dataclass(frozen=True, slots=True)
class IndexedEvent:
    """One escrow event as the indexer read it from a log (no ABI decoding)."""

    kind: str  # deposited, released, refunded
    id: str  # 0x hex
    block_number: int
    block_hash: str
    tx_hash: str
    encoded: bytes = b""  # deposits: the terms' ABI encoding
    deadline: int = 0
    buyer: str = ""
    seller: str = ""
    token: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """A refund transaction this keeper signed; `raw` and `tx` are read with `attempt_tx` when needed."""

    tx_hash: bytes
    signer: str
    escrow: str
    ids: tuple[bytes, ...]
    nonce: int
    status: str
    created_at: float
    updated_at: float
    block_number: int | None
    block_hash: str | None
    refunded: int | None
    gas_used: int | None


@dataclass(frozen=True, slots=True)
class Backoff:
    """A (token, buyer) whose refund payouts the token refused `failures` times in a row."""

    escrow: str
    token: str
    buyer: str
    failures: int
    retry_at: float
    reason: str
    since: float
    open_escrows: int


@dataclass(frozen=True, slots=True)
class Trouble:
    escrow: str
    id: bytes
    kind: str
    reason: str
    retry_at: float | None
    group: str | None
    since: float


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _bytes(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


class KeeperStore:
    """SQLite by default; one file, safe for several keeper processes and signers."""

    def __init__(self, database: str) -> None:
        self._ids: dict[str, tuple[bytes, ...]] = {}
        try:
            self.conn: sqlite3.Connection = open_sqlite(database)
            self._migrate()
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise ConfigError(f"database = {database!r}: cannot open it as SQLite: {exc}") from None

    def _migrate(self) -> None:
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version in (2, SCHEMA_VERSION):
            # Schema 2 lacks only the backoffs table, which the script creates.
            self.conn.executescript(_SCHEMA)
            if version != SCHEMA_VERSION:
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        with transaction(self.conn) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "deposits" in tables:
                # Schema 1 kept terms as JSON and scanned history for open escrows. The index is derived
                # from the chain, so it is rebuilt from start_block; refund attempts are kept, owned by
                # the key that signed them (the `from` of each recorded transaction).
                for table in ("deposits", "settlements", "checkpoints", "blocks", "failures"):
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
                if "attempts" in tables:
                    conn.execute("ALTER TABLE attempts RENAME TO attempts_v1")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if "attempts" in tables and "deposits" in tables:
                conn.execute(
                    "INSERT INTO attempts (tx_hash, signer, escrow, ids, nonce, raw, tx, status, created_at, "
                    "updated_at) SELECT tx_hash, lower(json_extract(tx, '$.from')), escrow, ids, nonce, raw, tx, "
                    "CASE status WHEN 'mined' THEN 'final' WHEN 'failed' THEN 'final' ELSE status END, "
                    "created_at, updated_at FROM attempts_v1"
                )
                conn.execute("DROP TABLE attempts_v1")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    # -- indexing --------------------------------------------------------------------------

    def checkpoint(self, escrow: str) -> int | None:
        row = self.conn.execute("SELECT block_number FROM checkpoints WHERE escrow = ?", (escrow,)).fetchone()
        return None if row is None else int(row[0])

    def block_hash(self, number: int) -> str | None:
        row = self.conn.execute("SELECT hash FROM blocks WHERE number = ?", (number,)).fetchone()
        return None if row is None else str(row[0])

    def block_hashes_below(self, number: int, limit: int) -> list[tuple[int, str]]:
        """Stored (number, hash) pairs below `number`, newest first: candidates for a reorg's fork point."""
        rows = self.conn.execute(
            "SELECT number, hash FROM blocks WHERE number < ? ORDER BY number DESC LIMIT ?", (number, limit)
        )
        return [(int(n), str(h)) for n, h in rows]

    def apply(
        self,
        escrow: str,
        *,
        rewind_to: int,
        events: Iterable[IndexedEvent],
        checkpoint: int,
        block_hashes: Sequence[tuple[int, str]],
        keep_hashes: int = 1_000,
    ) -> bool:
        """Undo everything indexed after `rewind_to`, add `events` (chain order), move the checkpoint.

        One transaction. Returns whether any escrow changed state.
        """
        changed = False
        with transaction(self.conn) as conn:
            undone = conn.execute(
                "SELECT id, kind FROM settlements WHERE escrow = ? AND block_number > ?", (escrow, rewind_to)
            ).fetchall()
            if undone:
                changed = True
                conn.execute("DELETE FROM settlements WHERE escrow = ? AND block_number > ?", (escrow, rewind_to))
                conn.executemany("UPDATE deposits SET open = 1 WHERE escrow = ? AND id = ?",
                                 [(escrow, i) for i, _ in undone])  # fmt: skip
                for kind in {k for _, k in undone}:
                    n = sum(1 for _, k in undone if k == kind)
                    conn.execute("UPDATE totals SET n = n - ? WHERE escrow = ? AND kind = ?", (n, escrow, kind))
            if conn.execute("DELETE FROM deposits WHERE escrow = ? AND block_number > ?", (escrow, rewind_to)).rowcount:
                changed = True
            deposits = []
            settled: dict[str, int] = {}
            settlements = []
            for e in events:
                if e.kind == "deposited":
                    deposits.append((escrow, e.id, e.encoded, e.deadline, e.buyer, e.seller, e.token,
                                     e.block_number, e.block_hash))  # fmt: skip
                else:
                    settlements.append((escrow, e.id, e.kind, e.tx_hash, e.block_number, e.block_hash))
            if deposits:
                changed = True
                conn.executemany("INSERT OR REPLACE INTO deposits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)", deposits)
            if settlements:
                changed = True
                for row in settlements:
                    inserted = conn.execute("INSERT OR IGNORE INTO settlements VALUES (?, ?, ?, ?, ?, ?)", row)
                    if inserted.rowcount:
                        settled[row[2]] = settled.get(row[2], 0) + 1
                ids = [(escrow, row[1]) for row in settlements]
                conn.executemany("UPDATE deposits SET open = 0 WHERE escrow = ? AND id = ?", ids)
                # A settled escrow has no trouble left: whatever held it up is moot.
                conn.executemany("DELETE FROM troubles WHERE escrow = ? AND id = ?", ids)
                for kind, n in settled.items():
                    conn.execute("INSERT OR IGNORE INTO totals VALUES (?, ?, 0)", (escrow, kind))
                    conn.execute("UPDATE totals SET n = n + ? WHERE escrow = ? AND kind = ?", (n, escrow, kind))
            conn.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?)", block_hashes)
            conn.execute("DELETE FROM blocks WHERE number < ?", (checkpoint - keep_hashes,))
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)", (escrow, checkpoint))
        return changed

    # -- decisions -------------------------------------------------------------------------

    def due(self, escrow: str, deadline_at_most: int, in_flight: set[bytes]) -> list[OpenEscrow]:
        """Open escrows whose deadline is at most `deadline_at_most`, soonest first, with their troubles."""
        rows = self.conn.execute(
            "SELECT d.id, d.terms, d.deadline, d.buyer, d.seller, d.token, t.kind, t.reason, t.retry_at, t.grp, "
            "b.retry_at FROM deposits d LEFT JOIN troubles t ON t.escrow = d.escrow AND t.id = d.id "
            "LEFT JOIN backoffs b ON b.escrow = d.escrow AND b.token = d.token AND b.buyer = d.buyer "
            "WHERE d.escrow = ? AND d.open = 1 AND d.deadline <= ? ORDER BY d.deadline",
            (escrow, deadline_at_most),
        )
        out = []
        for id_hex, encoded, deadline, buyer, seller, token, kind, reason, retry_at, grp, backoff in rows:
            escrow_id = bytes.fromhex(id_hex[2:])
            out.append(
                OpenEscrow(escrow, escrow_id, encoded, deadline, buyer, seller, token, escrow_id in in_flight,
                           retry_at if kind == SIMULATION else None, reason if kind == QUARANTINED else None,
                           grp if kind == SUSPECT else None, backoff)
            )  # fmt: skip
        return out

    def open_escrows(self, escrow: str, *, deadline_before: int | None = None) -> list[OpenEscrow]:
        """Every open escrow (or those due by `deadline_before`), soonest deadline first; for status and tests."""
        in_flight = {i for a in self.tracked_attempts(None) if a.status in IN_FLIGHT for i in a.ids}
        return self.due(escrow, 2**63 - 1 if deadline_before is None else deadline_before, in_flight)

    def counts(self, escrow: str) -> dict[str, int]:
        held = self.conn.execute("SELECT COUNT(*) FROM deposits WHERE escrow = ? AND open = 1", (escrow,)).fetchone()
        counts = {"held": int(held[0]), "released": 0, "refunded": 0}
        for kind, n in self.conn.execute("SELECT kind, n FROM totals WHERE escrow = ?", (escrow,)):
            counts[kind] = int(n)
        return counts

    def entries(self, escrow: str, ids: Iterable[bytes]) -> list[OpenEscrow]:
        """The indexed deposits of `ids`, in the order given (ids not indexed are left out)."""
        out = []
        for escrow_id in ids:
            row = self.conn.execute(
                "SELECT terms, deadline, buyer, seller, token FROM deposits WHERE escrow = ? AND id = ?",
                (escrow, _hex(escrow_id)),
            ).fetchone()
            if row is not None:
                out.append(OpenEscrow(escrow, escrow_id, row[0], row[1], row[2], row[3], row[4]))
        return out

    # -- refund attempts -------------------------------------------------------------------

    def record_attempt(self, escrow: str, signer: str, ids: Sequence[bytes], signed: SentTx) -> None:
        """Durable before the transaction is broadcast: status `signed`, with its raw bytes."""
        now = time.time()
        tx_json = json.dumps(
            {k: (_hex(bytes(v)) if isinstance(v, bytes | bytearray) else v) for k, v in signed.tx.items()}
        )
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, 'signed', ?, ?, NULL, NULL, NULL, NULL)",
                (_hex(signed.tx_hash), signer.lower(), escrow, json.dumps([_hex(i) for i in ids]), signed.nonce,
                 _hex(signed.raw), tx_json, now, now),
            )  # fmt: skip

    def set_attempt_status(
        self,
        tx_hash: bytes,
        status: str,
        *,
        block: tuple[int, str] | None = None,
        refunded: int | None = None,
        gas_used: int | None = None,
    ) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "UPDATE attempts SET status = ?, updated_at = ?, block_number = coalesce(?, block_number), "
                "block_hash = coalesce(?, block_hash), refunded = coalesce(?, refunded), "
                "gas_used = coalesce(?, gas_used) WHERE tx_hash = ?",
                (status, time.time(), block[0] if block else None, block[1] if block else None, refunded, gas_used,
                 _hex(tx_hash)),
            )  # fmt: skip

    def tracked_attempts(self, signer: str | None) -> list[Attempt]:
        """Attempts still followed up, oldest first: this signer's (None: every signer's, for status)."""
        sql = _TRACKED_SQL
        args: list[object] = list(TRACKED)
        if signer is not None:
            sql += " AND signer = ?"
            args.append(signer.lower())
        rows = self.conn.execute(sql + " ORDER BY created_at", args).fetchall()
        # An attempt's escrows never change: parsed once, kept while it is tracked (a batch of 250 ids is
        # 17 kB of JSON, and a keeper follows its transactions every cycle until they are final).
        self._ids = {r[0]: self._ids.get(r[0]) or self._read_ids(r[0]) for r in rows}
        return [
            Attempt(_bytes(r[0]), r[1], r[2], self._ids[r[0]], int(r[3]), r[4], float(r[5]), float(r[6]), r[7], r[8],
                    r[9], r[10])
            for r in rows
        ]  # fmt: skip

    def _read_ids(self, tx_hash: str) -> tuple[bytes, ...]:
        (text,) = self.conn.execute("SELECT ids FROM attempts WHERE tx_hash = ?", (tx_hash,)).fetchone()
        return tuple(bytes.fromhex(i[2:]) for i in json.loads(text))

    def attempt_tx(self, tx_hash: bytes) -> SentTx:
        """The signed transaction of an attempt, to broadcast it again or replace it."""
        row = self.conn.execute("SELECT nonce, tx, raw FROM attempts WHERE tx_hash = ?", (_hex(tx_hash),)).fetchone()
        tx = json.loads(row[1])
        if isinstance(tx.get("data"), str):
            tx["data"] = _bytes(tx["data"])
        return SentTx(tx_hash, int(row[0]), tx, _bytes(row[2]))

    def attempt_counts(self, signer: str | None = None) -> dict[str, int]:
        sql, args = "SELECT status, COUNT(*) FROM attempts", tuple[str, ...]()
        if signer is not None:
            sql, args = sql + " WHERE signer = ?", (signer.lower(),)
        return {status: int(n) for status, n in self.conn.execute(sql + " GROUP BY status", args)}

    # -- troubles --------------------------------------------------------------------------

    def record_failure(self, escrow: str, escrow_id: bytes, reason: str, retry_at: float) -> None:
        """Its refund reverts in simulation: try again at `retry_at` (a quarantine stays a quarantine)."""
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT INTO troubles VALUES (?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
                "kind = excluded.kind, reason = excluded.reason, retry_at = excluded.retry_at, grp = NULL "
                "WHERE troubles.kind != ?",
                (escrow, _hex(escrow_id), SIMULATION, reason, retry_at, time.time(), QUARANTINED),
            )

    def clear_failure(self, escrow: str, escrow_id: bytes) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "DELETE FROM troubles WHERE escrow = ? AND id = ? AND kind = ?", (escrow, _hex(escrow_id), SIMULATION)
            )

    def set_suspect_groups(self, escrow: str, groups: Sequence[tuple[str, Sequence[bytes]]], reason: str) -> None:
        now = time.time()
        with transaction(self.conn) as conn:
            for group, ids in groups:
                conn.executemany(
                    "INSERT INTO troubles VALUES (?, ?, ?, ?, NULL, ?, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
                    "kind = excluded.kind, reason = excluded.reason, retry_at = NULL, grp = excluded.grp "
                    "WHERE troubles.kind != ?",
                    [(escrow, _hex(i), SUSPECT, reason, group, now, QUARANTINED) for i in ids],
                )

    def quarantine(self, escrow: str, escrow_id: bytes, reason: str) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO troubles VALUES (?, ?, ?, ?, NULL, NULL, ?)",
                (escrow, _hex(escrow_id), QUARANTINED, reason, time.time()),
            )

    def troubles(self, escrow: str, kind: str) -> list[Trouble]:
        rows = self.conn.execute(
            "SELECT t.id, t.reason, t.retry_at, t.grp, t.since FROM troubles t JOIN deposits d "
            "ON d.escrow = t.escrow AND d.id = t.id WHERE t.escrow = ? AND t.kind = ? AND d.open = 1 "
            "ORDER BY t.since",
            (escrow, kind),
        )
        return [Trouble(escrow, _bytes(r[0]), kind, r[1], r[2], r[3], float(r[4])) for r in rows]

    def add_reverted_set(self, fingerprint: str, escrow: str, tx_hash: bytes, size: int) -> None:
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO reverted_sets VALUES (?, ?, ?, ?, ?)",
                (fingerprint, escrow, _hex(tx_hash), size, time.time()),
            )

    def is_reverted_set(self, fingerprint: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM reverted_sets WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return row is not None

    # -- payouts the token refused -------------------------------------------------------

    def record_refused_payout(
        self, escrow: str, token: str, buyer: str, reason: str, *, now: float, first_wait: float, longest_wait: float
    ) -> Backoff:
        """One more refused payout to `buyer` in `token`: wait `first_wait`, doubled per failure in a row, at most
        `longest_wait`, before its escrows are sent again."""
        token, buyer = token.lower(), buyer.lower()
        with transaction(self.conn) as conn:
            row = conn.execute(
                "SELECT failures, since FROM backoffs WHERE escrow = ? AND token = ? AND buyer = ?",
                (escrow, token, buyer),
            ).fetchone()
            failures = 1 if row is None else int(row[0]) + 1
            since = now if row is None else float(row[1])
            retry_at = now + min(first_wait * 2 ** (failures - 1), longest_wait)
            conn.execute(
                "INSERT OR REPLACE INTO backoffs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (escrow, token, buyer, failures, retry_at, reason, since),
            )
        return Backoff(escrow, token, buyer, failures, retry_at, reason, since, 0)

    def clear_backoffs(self, escrow: str, ids: Sequence[bytes]) -> int:
        """The payouts of these escrows went through: their buyers' backoffs end. Returns how many ended."""
        if not ids:
            return 0
        with transaction(self.conn) as conn:
            return int(
                conn.execute(
                    "DELETE FROM backoffs WHERE escrow = ? AND (token, buyer) IN (SELECT token, buyer FROM deposits "  # noqa: S608 - marks only
                    f"WHERE escrow = ? AND id IN ({', '.join('?' * len(ids))}))",
                    (escrow, escrow, *(_hex(i) for i in ids)),
                ).rowcount
            )

    def backoffs(self, escrow: str) -> list[Backoff]:
        """The backoffs that still hold some open escrow back, longest-standing first."""
        rows = self.conn.execute(
            "SELECT b.token, b.buyer, b.failures, b.retry_at, b.reason, b.since, COUNT(*) FROM backoffs b "
            "JOIN deposits d ON d.escrow = b.escrow AND d.token = b.token AND d.buyer = b.buyer AND d.open = 1 "
            "WHERE b.escrow = ? GROUP BY b.token, b.buyer ORDER BY b.since",
            (escrow,),
        )
        return [Backoff(escrow, r[0], r[1], int(r[2]), float(r[3]), r[4], float(r[5]), int(r[6])) for r in rows]
