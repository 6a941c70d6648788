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
replaces only its own transactions, so several keepers can share one database
(a SQLite file, or PostgreSQL through the storage port, tables in schema `keeper`).
Before it signs a batch, a keeper claims the batch's escrows (`claim`: rows taken with
FOR UPDATE SKIP LOCKED, marked with its address until a lease runs out, renewed while
its refund is in flight), so keepers sharing a database split the due escrows and
never send the same refund twice; a dead keeper's claims lapse with their lease.

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
from escrow_py.protocol.codec import parse_hex, to_hex
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import Terms
from escrow_py.storage import Database, Migration, Tx, describe, open_store, run_script

NAMESPACE = "keeper"

# Ids and transaction hashes are bytes (BLOB / BYTEA); addresses lower-case hex text.
_SCHEMA = """
CREATE TABLE deposits (
    escrow TEXT NOT NULL, id BLOB NOT NULL,
    terms BLOB NOT NULL,
    deadline INTEGER NOT NULL, buyer TEXT NOT NULL, seller TEXT NOT NULL, token TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    open INTEGER NOT NULL DEFAULT 1,
    claimed_by TEXT, claimed_until REAL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX deposits_by_block ON deposits (escrow, block_number);
CREATE INDEX deposits_open ON deposits (escrow, deadline) WHERE open = 1;
CREATE INDEX deposits_closed ON deposits (deadline) WHERE open = 0;
CREATE TABLE settlements (
    escrow TEXT NOT NULL, id BLOB NOT NULL, kind TEXT NOT NULL, tx_hash BLOB NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX settlements_by_block ON settlements (escrow, block_number);
CREATE TABLE totals (escrow TEXT NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (escrow, kind));
CREATE TABLE checkpoints (escrow TEXT PRIMARY KEY, block_number INTEGER NOT NULL);
CREATE TABLE blocks (number INTEGER PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE attempts (
    tx_hash BLOB PRIMARY KEY, signer TEXT NOT NULL, escrow TEXT NOT NULL, ids BLOB NOT NULL,
    nonce INTEGER NOT NULL, raw BLOB NOT NULL, tx TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    block_number INTEGER, block_hash TEXT, refunded INTEGER, gas_used INTEGER
);
CREATE INDEX attempts_by_signer ON attempts (signer, status);
CREATE INDEX attempts_by_status ON attempts (status, updated_at);
CREATE TABLE troubles (
    escrow TEXT NOT NULL, id BLOB NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
    retry_at REAL, grp TEXT, since REAL NOT NULL,
    PRIMARY KEY (escrow, id)
);
CREATE INDEX troubles_by_kind ON troubles (escrow, kind);
CREATE TABLE reverted_sets (
    fingerprint TEXT PRIMARY KEY, escrow TEXT NOT NULL, tx_hash BLOB NOT NULL, size INTEGER NOT NULL, at REAL NOT NULL
);
CREATE TABLE backoffs (
    escrow TEXT NOT NULL, token TEXT NOT NULL, buyer TEXT NOT NULL, failures INTEGER NOT NULL,
    retry_at REAL NOT NULL, reason TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (escrow, token, buyer)
)
"""

# Tables of the keepers before the storage port (SQLite only, versions in PRAGMA user_version), and the columns
# of each that held 0x-hex where the port keeps bytes.
_LEGACY_HEX = {
    "deposits": ("id",),
    "settlements": ("id", "tx_hash"),
    "totals": (),
    "checkpoints": (),
    "blocks": (),
    "attempts": ("tx_hash", "raw"),
    "troubles": ("id",),
    "reverted_sets": ("tx_hash",),
    "backoffs": (),
}


def _from_legacy(tx: Tx) -> None:
    """Schema 1: the whole store. A SQLite file a keeper of schema 1-3 left is carried over, not re-indexed."""
    legacy = {str(r[0]) for r in tx.all("SELECT name FROM sqlite_master WHERE type = 'table'")} if (
        tx.engine == "sqlite"
    ) else set()  # fmt: skip
    legacy &= set(_LEGACY_HEX) | {"failures"}
    if not legacy:
        run_script(tx, _SCHEMA)
        return
    version = int((tx.one("PRAGMA user_version") or (0,))[0])
    for table in legacy:
        tx.execute(f"ALTER TABLE {table} RENAME TO legacy_{table}")
    for index in tx.all("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"):
        tx.execute(f"DROP INDEX {index[0]}")
    run_script(tx, _SCHEMA)
    # Schema 1 kept terms as JSON: its index is rebuilt from the chain (start_block); its attempts are kept, owned
    # by the key that signed them. Schemas 2 and 3 differ from this one only by hex ids (3 added the backoffs).
    copied = [t for t in _LEGACY_HEX if t in legacy] if version >= 2 else ["attempts"] if "attempts" in legacy else []
    for table in copied:
        columns = [str(c[1]) for c in tx.all(f"PRAGMA table_info(legacy_{table})")]
        rows = tx.all(f"SELECT * FROM legacy_{table}")  # noqa: S608 - our own table names
        if table == "attempts":
            rows, columns = (
                [_legacy_attempt(dict(zip(columns, r, strict=True)), version) for r in rows],
                list(_ATTEMPT_COLUMNS),
            )
        hexed = [columns.index(c) for c in _LEGACY_HEX[table] if c in columns]
        fixed = [tuple(_bytes(v) if i in hexed and isinstance(v, str) else v for i, v in enumerate(r)) for r in rows]
        marks = ", ".join("?" * len(columns))
        tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", fixed)  # noqa: S608
    for table in legacy:
        tx.execute(f"DROP TABLE legacy_{table}")


_ATTEMPT_COLUMNS = ("tx_hash", "signer", "escrow", "ids", "nonce", "raw", "tx", "status", "created_at", "updated_at",
                    "block_number", "block_hash", "refunded", "gas_used")  # fmt: skip


def _legacy_attempt(row: dict[str, Any], version: int) -> tuple[Any, ...]:
    ids = b"".join(_bytes(i) for i in json.loads(row["ids"]))
    if version < 2:
        signer = str(json.loads(row["tx"]).get("from", "")).lower()
        status = {"mined": "final", "failed": "final"}.get(row["status"], row["status"])
        return (row["tx_hash"], signer, row["escrow"], ids, row["nonce"], row["raw"], row["tx"], status,
                row["created_at"], row["updated_at"], None, None, None, None)  # fmt: skip
    return tuple(ids if c == "ids" else row[c] for c in _ATTEMPT_COLUMNS)


def _claims_in_place(tx: Tx) -> None:
    """Schema 2: on PostgreSQL, deposits pages keep a fifth free, so that claiming a row (and renewing the claim
    every cycle while its refund is in flight) is a heap-only update: the new row version goes on the same page
    and no index gets a new entry (claimed_by and claimed_until are in no index). With full pages every claim
    added an entry to each of the table's indexes, and a batch's claim read more dead entries each time (at
    100,000 deposits, 200 claims of one batch: 1,100 buffers a claim growing past 1,600). Pages written from now
    on; SQLite updates rows in place and has nothing to change."""
    if tx.engine == "postgresql":
        tx.execute("ALTER TABLE deposits SET (fillfactor = 80)")


MIGRATIONS = (
    Migration(1, "keeper store", run=_from_legacy),
    Migration(2, "claims updated in place (PostgreSQL fillfactor)", run=_claims_in_place),
)

# How long a claim on an escrow keeps other keepers off it. Renewed every cycle while the claimant's refund is in
# flight; lapses when the claimant dies, so another keeper refunds what it left.
CLAIM_LEASE = 120.0

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
    return Terms.from_tuple(decode(list(_TERMS_TYPES), encoded))


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


def _bytes(value: str) -> bytes:
    return parse_hex(value, "a stored id")


class KeeperStore:
    """SQLite (a path or sqlite:/// URL) or PostgreSQL (postgresql://...); safe for several keeper processes."""

    def __init__(self, database: str) -> None:
        self._ids: dict[bytes, tuple[bytes, ...]] = {}
        try:
            self.db: Database = open_store(database, NAMESPACE, MIGRATIONS)
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise ConfigError(f"database = {describe(database)!r}: cannot open it as SQLite: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # -- indexing --------------------------------------------------------------------------

    def checkpoint(self, escrow: str) -> int | None:
        row = self.db.one("SELECT block_number FROM checkpoints WHERE escrow = ?", (escrow,))
        return None if row is None else int(row[0])

    def block_hash(self, number: int) -> str | None:
        row = self.db.one("SELECT hash FROM blocks WHERE number = ?", (number,))
        return None if row is None else str(row[0])

    def block_hashes_below(self, number: int, limit: int) -> list[tuple[int, str]]:
        """Stored (number, hash) pairs below `number`, newest first: candidates for a reorg's fork point."""
        rows = self.db.all("SELECT number, hash FROM blocks WHERE number < ? ORDER BY number DESC LIMIT ?",
                           (number, limit))  # fmt: skip
        return [(int(n), str(h)) for n, h in rows]

    def apply(
        self,
        escrow: str,
        *,
        rewind_to: int,
        events: Iterable[IndexedEvent],
        checkpoint: int,
        block_hashes: Sequence[tuple[int, str]],
        read_checkpoint: int | None,
        keep_hashes: int = 1_000,
    ) -> bool | None:
        """Undo everything indexed after `rewind_to`, add `events` (chain order), move the checkpoint.

        One transaction. Returns whether any escrow changed state, or None, writing nothing, when the
        stored checkpoint is no longer `read_checkpoint` (the one the caller read before fetching
        `events`): another keeper on this database indexed in between, and a rewind computed from the
        older checkpoint would undo what that keeper wrote since (its claims among it).
        """
        changed = False
        with self.db.transaction() as tx:
            # Keepers sharing a database index one escrow contract one at a time (SQLite: the write lock).
            tx.lock(f"index:{escrow}")
            now_at = tx.one("SELECT block_number FROM checkpoints WHERE escrow = ?", (escrow,))
            if (None if now_at is None else int(now_at[0])) != read_checkpoint:
                return None
            undone = tx.all("SELECT id, kind FROM settlements WHERE escrow = ? AND block_number > ?",
                            (escrow, rewind_to))  # fmt: skip
            if undone:
                changed = True
                tx.execute("DELETE FROM settlements WHERE escrow = ? AND block_number > ?", (escrow, rewind_to))
                tx.executemany("UPDATE deposits SET open = 1 WHERE escrow = ? AND id = ?",
                               [(escrow, bytes(i)) for i, _ in undone])  # fmt: skip
                for kind in {k for _, k in undone}:
                    n = sum(1 for _, k in undone if k == kind)
                    tx.execute("UPDATE totals SET n = n - ? WHERE escrow = ? AND kind = ?", (n, escrow, kind))
            deposits = []
            settled: dict[str, int] = {}
            settlements = []
            for e in events:
                if e.kind == "deposited":
                    deposits.append((escrow, _bytes(e.id), e.encoded, e.deadline, e.buyer, e.seller, e.token,
                                     e.block_number, e.block_hash))  # fmt: skip
                else:
                    settlements.append((escrow, _bytes(e.id), e.kind, _bytes(e.tx_hash), e.block_number,
                                        e.block_hash))  # fmt: skip
            # A deposit the rewind undid and the new events bring back (re-mined after a reorg) keeps its row, so
            # a keeper's claim on it stands while that keeper's refund may still land; only the gone ones go.
            again = {row[1] for row in deposits}
            gone = [(escrow, bytes(r[0])) for r in tx.all(
                "SELECT id FROM deposits WHERE escrow = ? AND block_number > ?", (escrow, rewind_to)
            ) if bytes(r[0]) not in again]  # fmt: skip
            if gone:
                changed = True
                tx.executemany("DELETE FROM deposits WHERE escrow = ? AND id = ?", gone)
            if deposits:
                changed = True
                tx.executemany(
                    "INSERT INTO deposits (escrow, id, terms, deadline, buyer, seller, token, block_number, "
                    "block_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
                    "terms = excluded.terms, "
                    "deadline = excluded.deadline, buyer = excluded.buyer, seller = excluded.seller, "
                    "token = excluded.token, block_number = excluded.block_number, "
                    "block_hash = excluded.block_hash, open = 1",
                    deposits,
                )
            if settlements:
                changed = True
                for row in settlements:
                    inserted = tx.execute(
                        "INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (escrow, id) DO NOTHING", row
                    )
                    if inserted.rowcount:
                        settled[row[2]] = settled.get(row[2], 0) + 1
                ids = [(escrow, row[1]) for row in settlements]
                tx.executemany("UPDATE deposits SET open = 0 WHERE escrow = ? AND id = ?", ids)
                # A settled escrow has no trouble left: whatever held it up is moot.
                tx.executemany("DELETE FROM troubles WHERE escrow = ? AND id = ?", ids)
                for kind, n in settled.items():
                    tx.execute("INSERT INTO totals VALUES (?, ?, ?) ON CONFLICT (escrow, kind) DO UPDATE SET "
                               "n = totals.n + excluded.n", (escrow, kind, n))  # fmt: skip
            tx.executemany("INSERT INTO blocks VALUES (?, ?) ON CONFLICT (number) DO UPDATE SET hash = excluded.hash",
                           block_hashes)  # fmt: skip
            tx.execute("DELETE FROM blocks WHERE number < ?", (checkpoint - keep_hashes,))
            tx.execute("INSERT INTO checkpoints VALUES (?, ?) ON CONFLICT (escrow) DO UPDATE SET "
                       "block_number = excluded.block_number", (escrow, checkpoint))  # fmt: skip
        return changed

    # -- decisions -------------------------------------------------------------------------

    def due(
        self, escrow: str, deadline_at_most: int, in_flight: set[bytes], *, claimable_by: str | None = None,
        now: float = 0.0,
    ) -> list[OpenEscrow]:  # fmt: skip
        """Open escrows whose deadline is at most `deadline_at_most`, soonest first, with their troubles.

        With `claimable_by`, only those no other keeper holds a live claim on at wall time `now`.
        """
        sql = (
            "SELECT d.id, d.terms, d.deadline, d.buyer, d.seller, d.token, t.kind, t.reason, t.retry_at, t.grp, "
            "b.retry_at FROM deposits d LEFT JOIN troubles t ON t.escrow = d.escrow AND t.id = d.id "
            "LEFT JOIN backoffs b ON b.escrow = d.escrow AND b.token = d.token AND b.buyer = d.buyer "
            "WHERE d.escrow = ? AND d.open = 1 AND d.deadline <= ?"
        )
        args: list[object] = [escrow, deadline_at_most]
        if claimable_by is not None:
            sql += " AND (d.claimed_by IS NULL OR d.claimed_by = ? OR d.claimed_until < ?)"
            args += [claimable_by.lower(), now]
        out = []
        for id_, encoded, deadline, buyer, seller, token, kind, reason, retry_at, grp, backoff in self.db.all(
            sql + " ORDER BY d.deadline", args
        ):
            escrow_id = bytes(id_)
            out.append(
                OpenEscrow(escrow, escrow_id, bytes(encoded), int(deadline), buyer, seller, token,
                           escrow_id in in_flight, retry_at if kind == SIMULATION else None,
                           reason if kind == QUARANTINED else None, grp if kind == SUSPECT else None, backoff)
            )  # fmt: skip
        return out

    def claim(
        self, escrow: str, signer: str, ids: Sequence[bytes], now: float, lease: float = CLAIM_LEASE
    ) -> set[bytes]:
        """Claim the open escrows of `ids` that no other keeper holds (or whose claim lapsed): the ones returned are
        this signer's to refund until `now + lease`. Rows another keeper is claiming this instant are skipped."""
        if not ids:
            return set()
        signer = signer.lower()
        got: set[bytes] = set()
        for chunk in _chunks(list(ids), 500):
            # One statement, its own transaction (a chunk's claims stand alone, so no BEGIN and COMMIT round trips
            # around it): the rows are claimed as they are read, and those another keeper is claiming this instant
            # are skipped, not waited for. PostgreSQL takes the ids as one array (one parameter to bind, not 500).
            args: list[object]
            if self.db.engine == "postgresql":
                among, args, skip = "id = ANY(?)", [chunk], " FOR UPDATE SKIP LOCKED"
            else:
                among, args, skip = f"id IN ({', '.join('?' * len(chunk))})", list(chunk), ""
            rows = self.db.all(
                "UPDATE deposits SET claimed_by = ?, claimed_until = ? WHERE escrow = ? AND id IN ("  # noqa: S608
                f"SELECT id FROM deposits WHERE escrow = ? AND {among} AND open = 1 "
                f"AND (claimed_by IS NULL OR claimed_by = ? OR claimed_until < ?){skip}) RETURNING id",
                (signer, now + lease, escrow, escrow, *args, signer, now),
            )
            got.update(bytes(r[0]) for r in rows)
        return got

    def renew_claims(
        self, escrow: str, signer: str, ids: Iterable[bytes], now: float, lease: float = CLAIM_LEASE
    ) -> None:
        """Keep this signer's claims on `ids` (its refunds in flight) for another lease."""
        signer = signer.lower()
        rows = [(now + lease, escrow, i, signer) for i in ids]
        if rows:
            with self.db.transaction() as tx:
                tx.executemany("UPDATE deposits SET claimed_until = ? WHERE escrow = ? AND id = ? AND claimed_by = ?",
                               rows)  # fmt: skip

    def open_escrows(self, escrow: str, *, deadline_before: int | None = None) -> list[OpenEscrow]:
        """Every open escrow (or those due by `deadline_before`), soonest deadline first; for status and tests."""
        in_flight = {i for a in self.tracked_attempts(None) if a.status in IN_FLIGHT for i in a.ids}
        return self.due(escrow, 2**63 - 1 if deadline_before is None else deadline_before, in_flight)

    def counts(self, escrow: str) -> dict[str, int]:
        held = self.db.one("SELECT COUNT(*) FROM deposits WHERE escrow = ? AND open = 1", (escrow,))
        counts = {"held": int(held[0]) if held else 0, "released": 0, "refunded": 0}
        for kind, n in self.db.all("SELECT kind, n FROM totals WHERE escrow = ?", (escrow,)):
            counts[kind] = int(n)
        return counts

    def entries(self, escrow: str, ids: Iterable[bytes]) -> list[OpenEscrow]:
        """The indexed deposits of `ids`, in the order given (ids not indexed are left out)."""
        out = []
        with self.db.read() as tx:
            for escrow_id in ids:
                row = tx.one("SELECT terms, deadline, buyer, seller, token FROM deposits WHERE escrow = ? AND id = ?",
                             (escrow, escrow_id))  # fmt: skip
                if row is not None:
                    out.append(OpenEscrow(escrow, escrow_id, bytes(row[0]), int(row[1]), row[2], row[3], row[4]))
        return out

    # -- refund attempts -------------------------------------------------------------------

    def record_attempt(self, escrow: str, signer: str, ids: Sequence[bytes], signed: SentTx) -> None:
        """Durable before the transaction is broadcast: status `signed`, with its raw bytes."""
        now = time.time()
        tx_json = json.dumps(
            {k: (to_hex(bytes(v)) if isinstance(v, bytes | bytearray) else v) for k, v in signed.tx.items()}
        )
        self.db.execute(
            "INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, 'signed', ?, ?, NULL, NULL, NULL, NULL) "
            "ON CONFLICT (tx_hash) DO UPDATE SET status = 'signed', updated_at = excluded.updated_at",
            (bytes(signed.tx_hash), signer.lower(), escrow, b"".join(ids), signed.nonce, bytes(signed.raw), tx_json,
             now, now),
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
        self.db.execute(
            "UPDATE attempts SET status = ?, updated_at = ?, block_number = coalesce(?, block_number), "
            "block_hash = coalesce(?, block_hash), refunded = coalesce(?, refunded), "
            "gas_used = coalesce(?, gas_used) WHERE tx_hash = ?",
            (status, time.time(), block[0] if block else None, block[1] if block else None, refunded, gas_used,
             bytes(tx_hash)),
        )  # fmt: skip

    def tracked_attempts(self, signer: str | None) -> list[Attempt]:
        """Attempts still followed up, oldest first: this signer's (None: every signer's, for status)."""
        sql = _TRACKED_SQL
        args: list[object] = list(TRACKED)
        if signer is not None:
            sql += " AND signer = ?"
            args.append(signer.lower())
        rows = self.db.all(sql + " ORDER BY created_at", args)
        # An attempt's escrows never change: read once, kept while it is tracked (a batch of 250 ids is 8 kB,
        # and a keeper follows its transactions every cycle until they are final).
        self._ids = {bytes(r[0]): self._ids.get(bytes(r[0])) or self._read_ids(bytes(r[0])) for r in rows}
        return [
            Attempt(bytes(r[0]), r[1], r[2], self._ids[bytes(r[0])], int(r[3]), r[4], float(r[5]), float(r[6]), r[7],
                    r[8], r[9], r[10])
            for r in rows
        ]  # fmt: skip

    def _read_ids(self, tx_hash: bytes) -> tuple[bytes, ...]:
        (blob,) = self.db.one("SELECT ids FROM attempts WHERE tx_hash = ?", (tx_hash,)) or (b"",)
        blob = bytes(blob)
        return tuple(blob[i : i + 32] for i in range(0, len(blob), 32))

    def attempt_tx(self, tx_hash: bytes) -> SentTx:
        """The signed transaction of an attempt, to broadcast it again or replace it."""
        row = self.db.one("SELECT nonce, tx, raw FROM attempts WHERE tx_hash = ?", (bytes(tx_hash),))
        if row is None:
            raise KeyError(f"no refund attempt {to_hex(tx_hash)} in {self.db.url}")
        tx = json.loads(row[1])
        if isinstance(tx.get("data"), str):
            tx["data"] = _bytes(tx["data"])
        return SentTx(tx_hash, int(row[0]), tx, bytes(row[2]))

    def attempt_counts(self, signer: str | None = None) -> dict[str, int]:
        sql, args = "SELECT status, COUNT(*) FROM attempts", tuple[str, ...]()
        if signer is not None:
            sql, args = sql + " WHERE signer = ?", (signer.lower(),)
        return {status: int(n) for status, n in self.db.all(sql + " GROUP BY status", args)}

    # -- troubles --------------------------------------------------------------------------

    def record_failure(self, escrow: str, escrow_id: bytes, reason: str, retry_at: float) -> None:
        """Its refund reverts in simulation: try again at `retry_at` (a quarantine stays a quarantine)."""
        self.db.execute(
            "INSERT INTO troubles VALUES (?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
            "kind = excluded.kind, reason = excluded.reason, retry_at = excluded.retry_at, grp = NULL "
            "WHERE troubles.kind != ?",
            (escrow, escrow_id, SIMULATION, reason, retry_at, time.time(), QUARANTINED),
        )

    def clear_failure(self, escrow: str, escrow_id: bytes) -> None:
        self.db.execute("DELETE FROM troubles WHERE escrow = ? AND id = ? AND kind = ?",
                        (escrow, escrow_id, SIMULATION))  # fmt: skip

    def set_suspect_groups(self, escrow: str, groups: Sequence[tuple[str, Sequence[bytes]]], reason: str) -> None:
        now = time.time()
        with self.db.transaction() as tx:
            for group, ids in groups:
                tx.executemany(
                    "INSERT INTO troubles VALUES (?, ?, ?, ?, NULL, ?, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
                    "kind = excluded.kind, reason = excluded.reason, retry_at = NULL, grp = excluded.grp "
                    "WHERE troubles.kind != ?",
                    [(escrow, i, SUSPECT, reason, group, now, QUARANTINED) for i in ids],
                )

    def quarantine(self, escrow: str, escrow_id: bytes, reason: str) -> None:
        self.db.execute(
            "INSERT INTO troubles VALUES (?, ?, ?, ?, NULL, NULL, ?) ON CONFLICT (escrow, id) DO UPDATE SET "
            "kind = excluded.kind, reason = excluded.reason, retry_at = NULL, grp = NULL, since = excluded.since",
            (escrow, escrow_id, QUARANTINED, reason, time.time()),
        )

    def troubles(self, escrow: str, kind: str) -> list[Trouble]:
        rows = self.db.all(
            "SELECT t.id, t.reason, t.retry_at, t.grp, t.since FROM troubles t JOIN deposits d "
            "ON d.escrow = t.escrow AND d.id = t.id WHERE t.escrow = ? AND t.kind = ? AND d.open = 1 "
            "ORDER BY t.since",
            (escrow, kind),
        )
        return [Trouble(escrow, bytes(r[0]), kind, r[1], r[2], r[3], float(r[4])) for r in rows]

    def add_reverted_set(self, fingerprint: str, escrow: str, tx_hash: bytes, size: int) -> None:
        self.db.execute(
            "INSERT INTO reverted_sets VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
            (fingerprint, escrow, bytes(tx_hash), size, time.time()),
        )

    def is_reverted_set(self, fingerprint: str) -> bool:
        return self.db.one("SELECT 1 FROM reverted_sets WHERE fingerprint = ?", (fingerprint,)) is not None

    # -- payouts the token refused -------------------------------------------------------

    def record_refused_payout(
        self, escrow: str, token: str, buyer: str, reason: str, *, now: float, first_wait: float, longest_wait: float
    ) -> Backoff:
        """One more refused payout to `buyer` in `token`: wait `first_wait`, doubled per failure in a row, at most
        `longest_wait`, before its escrows are sent again."""
        token, buyer = token.lower(), buyer.lower()
        with self.db.transaction() as tx:
            tx.lock(f"backoff:{escrow}:{token}:{buyer}")
            row = tx.one("SELECT failures, since FROM backoffs WHERE escrow = ? AND token = ? AND buyer = ?",
                         (escrow, token, buyer))  # fmt: skip
            failures = 1 if row is None else int(row[0]) + 1
            since = now if row is None else float(row[1])
            retry_at = now + min(first_wait * 2 ** (failures - 1), longest_wait)
            tx.execute(
                "INSERT INTO backoffs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (escrow, token, buyer) DO UPDATE SET "
                "failures = excluded.failures, retry_at = excluded.retry_at, reason = excluded.reason, "
                "since = excluded.since",
                (escrow, token, buyer, failures, retry_at, reason, since),
            )
        return Backoff(escrow, token, buyer, failures, retry_at, reason, since, 0)

    def clear_backoffs(self, escrow: str, ids: Sequence[bytes]) -> int:
        """The payouts of these escrows went through: their buyers' backoffs end. Returns how many ended."""
        if not ids:
            return 0
        return self.db.execute(
            "DELETE FROM backoffs WHERE escrow = ? AND (token, buyer) IN (SELECT token, buyer FROM deposits "  # noqa: S608 - marks only
            f"WHERE escrow = ? AND id IN ({', '.join('?' * len(ids))}))",
            (escrow, escrow, *ids),
        )

    def backoffs(self, escrow: str) -> list[Backoff]:
        """The backoffs that still hold some open escrow back, longest-standing first."""
        rows = self.db.all(
            "SELECT b.token, b.buyer, b.failures, b.retry_at, b.reason, b.since, COUNT(*) FROM backoffs b "
            "JOIN deposits d ON d.escrow = b.escrow AND d.token = b.token AND d.buyer = b.buyer AND d.open = 1 "
            "WHERE b.escrow = ? GROUP BY b.escrow, b.token, b.buyer ORDER BY b.since",
            (escrow,),
        )
        return [Backoff(escrow, r[0], r[1], int(r[2]), float(r[3]), r[4], float(r[5]), int(r[6])) for r in rows]


def _chunks(items: list[bytes], size: int) -> Iterable[list[bytes]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


FINISHED_ATTEMPTS = ("final", "dropped", "rejected")


def prune(db: Database, *, before: float) -> dict[str, int]:
    """Forget what no decision needs any more: settled escrows whose deadline is before `before` (chain seconds)
    with their settlements and troubles, and finished refund attempts, reverted sets and lapsed backoffs last
    touched before it (wall seconds). Open escrows, tracked attempts and the running totals stay.

    `before` should lie well behind the reorg depth and any audit window: a pruned settlement is not undone by
    a reorg, and a status or audit that wants it must read it from the chain.
    """
    closed = "SELECT id FROM deposits WHERE escrow = settlements.escrow AND open = 0 AND deadline < ?"
    with db.transaction() as tx:
        counts = {
            "settlements": tx.execute(f"DELETE FROM settlements WHERE id IN ({closed})", (before,)).rowcount,  # noqa: S608
            "troubles": tx.execute(
                "DELETE FROM troubles WHERE id IN (SELECT id FROM deposits WHERE escrow = troubles.escrow "
                "AND open = 0 AND deadline < ?)",
                (before,),
            ).rowcount,
            "deposits": tx.execute("DELETE FROM deposits WHERE open = 0 AND deadline < ?", (before,)).rowcount,
            "attempts": tx.execute(
                "DELETE FROM attempts WHERE status IN (?, ?, ?) AND updated_at < ?", (*FINISHED_ATTEMPTS, before)
            ).rowcount,
            "reverted_sets": tx.execute("DELETE FROM reverted_sets WHERE at < ?", (before,)).rowcount,
            "backoffs": tx.execute(
                "DELETE FROM backoffs WHERE retry_at < ? AND NOT EXISTS (SELECT 1 FROM deposits d WHERE "
                "d.escrow = backoffs.escrow AND d.token = backoffs.token AND d.buyer = backoffs.buyer AND d.open = 1)",
                (before,),
            ).rowcount,
        }
    return counts
