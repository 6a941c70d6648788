"""What keeps the keeper's cost flat: stored calldata, capped batches, indexed queries, quiet idle cycles."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from eth_abi.abi import encode
from fixtures.chain import Chain
from helpers import deposit, dev, make_terms, offline_terms
from rpc_proxy import RpcProxy

from escrow_devtools.build import CONTRACTS_DIR
from escrow_py.keeper import KeeperConfig, OpenEscrow
from escrow_py.keeper._batch import (
    PAYOUT_GAS,
    PAYOUT_GAS_NEEDED,
    REFUND_MANY,
    batch_gas,
    max_entries,
    ordered,
    refund_many_data,
)
from escrow_py.keeper._config import MAX_BATCH_SIZE, MAX_CALLDATA_BYTES
from escrow_py.keeper._store import IndexedEvent, KeeperStore, encode_terms
from escrow_py.protocol.errors import ConfigError
from escrow_py.storage import SqliteDatabase

from .kit import make_keeper


def test_the_indexed_bytes_are_the_abi_encoding_and_a_batch_is_the_contracts_calldata(
    chain: Chain, tmp_path: Path
) -> None:
    batch = [make_terms(chain, window=60, amount=1_000 + n) for n in range(5)]
    for terms in batch:
        deposit(chain, terms)
    keeper = make_keeper(chain, tmp_path / "k.sqlite")
    keeper.index()
    entries = ordered(keeper.store.open_escrows(chain.escrow.address))
    by_id = {chain.escrow.id_of(t): t for t in batch}
    for entry in entries:
        assert entry.encoded == encode_terms(by_id[entry.id])  # the log's words, stored as they came
        assert entry.terms == by_id[entry.id]
    terms_in_order = [by_id[e.id] for e in entries]
    expected = REFUND_MANY + encode(["(address,address,address,address,uint256,uint64,bytes32,bytes32)[]"],
                                    [[t.as_tuple() for t in terms_in_order]])  # fmt: skip
    assert refund_many_data(entries) == expected
    assert refund_many_data(entries) == chain.escrow.refund_many_data(terms_in_order)


def test_a_batchs_gas_holds_the_reserve_the_escrow_checks_before_a_payout() -> None:
    """X402Escrow reverts a batch (InsufficientGas) unless PAYOUT_GAS + 1/63 of it + CALL_OVERHEAD is left before
    each payout; the keeper's constants repeat the contract's, so a change there must show here."""
    source = (CONTRACTS_DIR / "X402Escrow.sol").read_text()
    assert f"uint256 internal constant PAYOUT_GAS = {PAYOUT_GAS:_};" in source
    assert "uint256 private constant CALL_OVERHEAD = 10_000;" in source
    assert "PAYOUT_GAS_NEEDED = PAYOUT_GAS + PAYOUT_GAS / 63 + CALL_OVERHEAD;" in source
    assert PAYOUT_GAS_NEEDED == PAYOUT_GAS + PAYOUT_GAS // 63 + 10_000
    assert batch_gas(1) - PAYOUT_GAS_NEEDED >= 60_000  # one entry's refund still has its own gas besides


def test_batches_are_capped_by_calldata_and_gas() -> None:
    assert max_entries(10_000, 10**12, 10**12) == MAX_BATCH_SIZE == 468
    terms = offline_terms(1, 1)
    full = [OpenEscrow.of("0x", n.to_bytes(32, "big"), terms) for n in range(MAX_BATCH_SIZE)]
    assert len(refund_many_data(full)) <= MAX_CALLDATA_BYTES < len(refund_many_data([*full, full[0]]))
    cap = max_entries(400, 5_000_000, 60_000_000)  # the configured gas cap binds
    assert batch_gas(cap) <= 5_000_000 < batch_gas(cap + 1)
    cap = max_entries(400, 50_000_000, 30_000_000)  # half the block's gas limit binds
    assert batch_gas(cap) <= 15_000_000 < batch_gas(cap + 1)
    assert max_entries(1, 10**9, 10**9) == 1
    with pytest.raises(ConfigError, match="batch_size = 469: expected an integer from 1 to 468"):
        KeeperConfig.load({"rpc_url": "http://x", "escrows": dev(1).address, "batch_size": 469}, environ={})


def _sqlite(store: KeeperStore) -> sqlite3.Connection:
    assert isinstance(store.db, SqliteDatabase)
    return store.db.conn


def _plan(store: KeeperStore, sql: str, *args: object) -> str:
    return " | ".join(str(row[-1]) for row in _sqlite(store).execute("EXPLAIN QUERY PLAN " + sql, args))


def test_the_open_escrow_query_and_the_reorg_delete_use_indexes(tmp_path: Path) -> None:
    store = KeeperStore(str(tmp_path / "k.sqlite"))
    due = _plan(store, "SELECT d.id FROM deposits d LEFT JOIN troubles t ON t.escrow = d.escrow AND t.id = d.id "
                "WHERE d.escrow = ? AND d.open = 1 AND d.deadline <= ? ORDER BY d.deadline", "0x", 1)  # fmt: skip
    assert "USING INDEX deposits_open" in due and "SCAN d" not in due
    assert "deposits_by_block" in _plan(store, "DELETE FROM deposits WHERE escrow = ? AND block_number > ?", "0x", 1)
    assert "settlements_by_block" in _plan(
        store, "SELECT id, kind FROM settlements WHERE escrow = ? AND block_number > ?", "0x", 1
    )
    held = _plan(store, "SELECT COUNT(*) FROM deposits WHERE escrow = ? AND open = 1", "0x")
    assert "deposits_open" in held


def _history(store: KeeperStore, escrow: str, n: int, below: int) -> None:
    """`n` escrows deposited and refunded long ago, as the indexer would have stored them."""
    events = []
    for i in range(n):
        escrow_id = "0x" + os.urandom(32).hex()
        block = max(1, below - 1 - i % 50)
        events.append(IndexedEvent("deposited", escrow_id, block, "0x" + "ab" * 32, "0x" + "cd" * 32,
                                   encoded=bytes(256), deadline=1, buyer="0x" + "11" * 20, seller="0x" + "22" * 20,
                                   token="0x" + "33" * 20))  # fmt: skip
        events.append(IndexedEvent("refunded", escrow_id, block, "0x" + "ab" * 32, "0x" + "ef" * 32))
    store.apply(escrow, rewind_to=below, events=events, checkpoint=store.checkpoint(escrow) or below,
                block_hashes=[], read_checkpoint=store.checkpoint(escrow))  # fmt: skip


def _cycle_cost(chain: Chain, db: Path, history: int) -> tuple[int, dict[str, int], int]:
    """(SQLite VM steps, RPC calls by method) of one cycle after a new empty block, and of an idle cycle's RPCs."""
    proxy = RpcProxy(chain.node.url)
    try:
        keeper = make_keeper(chain, db, rpc_url=proxy.url)
        keeper.run_once()
        _history(keeper.store, chain.escrow.address, history, int(chain.w3.eth.block_number))
        chain.mine()
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        _sqlite(keeper.store).set_progress_handler(count, 100)
        proxy.calls.clear()
        keeper.run_once()
        busy = dict(proxy.calls)
        proxy.calls.clear()
        keeper.run_once()  # no new block: an idle cycle
        idle = sum(proxy.calls.values())
        keeper.close()
        return steps, busy, idle
    finally:
        proxy.close()


def test_a_cycle_costs_the_same_with_a_long_history(chain: Chain, tmp_path: Path) -> None:
    """10,000 settled escrows in the store change neither a cycle's RPC calls nor (much) its SQLite work."""
    deposit(chain, make_terms(chain, window=10_000))  # one open escrow, not due
    fresh_steps, fresh_calls, fresh_idle = _cycle_cost(chain, tmp_path / "fresh.sqlite", 0)
    long_steps, long_calls, long_idle = _cycle_cost(chain, tmp_path / "long.sqlite", 10_000)
    assert long_calls == fresh_calls
    # The head, the checkpoint's hash, the logs of the new block with that block (one batch: the same backend).
    assert sum(long_calls.values()) <= 4
    assert fresh_idle == long_idle == 1  # an idle cycle reads the head and nothing else
    assert long_steps <= fresh_steps * 2 + 50, (fresh_steps, long_steps)


# What a keeper before the storage port left (schema 2: PRAGMA user_version, 0x-hex ids, no backoffs table).
_SCHEMA_2 = """
CREATE TABLE deposits (escrow TEXT NOT NULL, id TEXT NOT NULL, terms BLOB NOT NULL, deadline INTEGER NOT NULL,
    buyer TEXT NOT NULL, seller TEXT NOT NULL, token TEXT NOT NULL, block_number INTEGER NOT NULL,
    block_hash TEXT NOT NULL, open INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (escrow, id));
CREATE INDEX deposits_open ON deposits (escrow, deadline) WHERE open = 1;
CREATE TABLE settlements (escrow TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, tx_hash TEXT NOT NULL,
    block_number INTEGER NOT NULL, block_hash TEXT NOT NULL, PRIMARY KEY (escrow, id));
CREATE TABLE totals (escrow TEXT NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (escrow, kind));
CREATE TABLE checkpoints (escrow TEXT PRIMARY KEY, block_number INTEGER NOT NULL);
CREATE TABLE blocks (number INTEGER PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE attempts (tx_hash TEXT PRIMARY KEY, signer TEXT NOT NULL, escrow TEXT NOT NULL, ids TEXT NOT NULL,
    nonce INTEGER NOT NULL, raw TEXT NOT NULL, tx TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, block_number INTEGER, block_hash TEXT, refunded INTEGER, gas_used INTEGER);
CREATE TABLE troubles (escrow TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
    retry_at REAL, grp TEXT, since REAL NOT NULL, PRIMARY KEY (escrow, id));
CREATE TABLE reverted_sets (fingerprint TEXT PRIMARY KEY, escrow TEXT NOT NULL, tx_hash TEXT NOT NULL,
    size INTEGER NOT NULL, at REAL NOT NULL);
PRAGMA user_version = 2;
"""


def test_a_schema_2_database_is_carried_over_to_byte_ids_without_reindexing(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    old = sqlite3.connect(db)
    old.executescript(_SCHEMA_2)
    escrow_id, tx_hash = "0x" + "11" * 32, "0x" + "99" * 32
    old.execute("INSERT INTO deposits VALUES ('0xescrow', ?, ?, 9, ?, ?, ?, 5, '0xaa', 1)",
                (escrow_id, b"\0" * 256, "0x" + "22" * 20, "0x" + "33" * 20, "0x" + "44" * 20))  # fmt: skip
    old.execute("INSERT INTO checkpoints VALUES ('0xescrow', 5)")
    old.execute("INSERT INTO blocks VALUES (5, '0xaa')")
    old.execute("INSERT INTO troubles VALUES ('0xescrow', ?, 'quarantined', 'reverts alone', NULL, NULL, 1.0)",
                (escrow_id,))  # fmt: skip
    old.execute("INSERT INTO attempts VALUES (?, '0xkeeper', '0xescrow', ?, 3, '0x02f8', '{}', 'sent', 1.0, 2.0, "
                "NULL, NULL, NULL, NULL)", (tx_hash, f'["{escrow_id}"]'))  # fmt: skip
    old.commit()
    old.close()
    reopened = KeeperStore(str(db))
    assert reopened.checkpoint("0xescrow") == 5 and reopened.block_hash(5) == "0xaa"  # not re-indexed
    [entry] = reopened.open_escrows("0xescrow")
    assert entry.id == b"\x11" * 32 and entry.quarantined == "reverts alone" and entry.in_flight
    [attempt] = reopened.tracked_attempts("0xkeeper")
    assert (attempt.tx_hash, attempt.ids, attempt.nonce) == (b"\x99" * 32, (b"\x11" * 32,), 3)
    assert reopened.attempt_tx(b"\x99" * 32).raw == b"\x02\xf8"
    reopened.close()
    assert KeeperStore(str(db)).checkpoint("0xescrow") == 5  # a second start migrates nothing


def test_refused_payouts_back_off_doubling_up_to_the_longest_wait(db_url: str) -> None:
    store = KeeperStore(db_url)
    event = IndexedEvent("deposited", "0x" + "11" * 32, 5, "0xaa", "0xbb", encoded=b"\0" * 256, deadline=9,
                         buyer="0x" + "22" * 20, seller="0x" + "33" * 20, token="0x" + "44" * 20)  # fmt: skip
    store.apply("0xescrow", rewind_to=0, events=[event], checkpoint=5, block_hashes=[(5, "0xaa")], read_checkpoint=None)
    store.record_refused_payout("0xescrow", "0x" + "44" * 20, "0x" + "22" * 20, "PayoutFailed", now=0.0,
                                first_wait=300.0, longest_wait=3600.0)  # fmt: skip
    [backoff] = store.backoffs("0xescrow")
    assert (backoff.failures, backoff.retry_at, backoff.open_escrows) == (1, 300.0, 1)
    assert store.open_escrows("0xescrow")[0].backoff_until == 300.0
    for _ in range(10):  # 300, 600, 1200, 2400, then the longest wait
        backoff = store.record_refused_payout("0xescrow", "0x" + "44" * 20, "0x" + "22" * 20, "PayoutFailed",
                                              now=0.0, first_wait=300.0, longest_wait=3600.0)  # fmt: skip
    assert (backoff.failures, backoff.retry_at) == (11, 3600.0)
    assert store.clear_backoffs("0xescrow", [b"\x11" * 32]) == 1
    assert store.backoffs("0xescrow") == []
