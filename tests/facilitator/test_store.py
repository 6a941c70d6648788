"""The facilitator's own tables (API keys, idempotency records, ledger) on both engines of the storage port."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from helpers import SELLER, SELLER2, address
from web3.types import TxReceipt

from escrow_devtools.bench.postgres import PostgresServer
from escrow_py.facilitator import KeyStore
from escrow_py.facilitator._keys import STALE_AFTER, IdempotencyConflict
from escrow_py.facilitator._ledger import Ledger
from escrow_py.facilitator._tables import NAMESPACE
from escrow_py.seller._store import SellerStore
from escrow_py.storage import open_database


def test_keys_are_hashed_at_rest_scoped_and_revocable(db_url: str) -> None:
    keys = KeyStore(db_url)
    try:
        key_id, key = keys.create("shop", [address(SELLER), address(SELLER2)])
        found = keys.authenticate(key)
        assert found is not None and found.key_id == key_id
        assert found.pay_to == {address(SELLER), address(SELLER2)}
        secret = key.split("_", 2)[2]
        assert keys.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
        assert keys.authenticate(f"x4f_{'0' * 16}_{secret}") is None  # unknown id
        assert keys.authenticate("garbage") is None
        db = open_database(db_url, NAMESPACE)
        try:
            stored = db.all("SELECT secret_sha256 FROM api_keys")
        finally:
            db.close()
        assert stored and all(secret not in str(row[0]) for row in stored)  # only the digest is kept
        assert keys.revoke(key_id) and not keys.revoke(key_id)
        assert keys.authenticate(key) is None
        assert [(k.key_id, k.revoked) for k in keys.list()] == [(key_id, True)]
    finally:
        keys.close()


def test_an_idempotency_key_is_claimed_once_answered_once_and_bound_to_its_body(db_url: str) -> None:
    a, b = KeyStore(db_url), KeyStore(db_url)  # two replicas on one database
    try:
        assert a.begin("k1", "idem-1", "deliver", "aa") is None  # claimed
        with pytest.raises(IdempotencyConflict) as running:
            b.begin("k1", "idem-1", "deliver", "aa")
        assert running.value.status == 409  # the first request is still in flight
        with pytest.raises(IdempotencyConflict) as other_body:
            b.begin("k1", "idem-1", "deliver", "bb")
        assert other_body.value.status == 422
        a.finish("k1", "idem-1", 202, {"deliveries": []})
        recorded = b.begin("k1", "idem-1", "deliver", "aa")
        assert recorded is not None and (recorded.status, recorded.body) == (202, {"deliveries": []})
        assert b.begin("k2", "idem-1", "deliver", "aa") is None  # keys are per API key
        a.begin("k1", "idem-2", "refund", "cc")
        a.abandon("k1", "idem-2")  # a 5xx: the same request may come again
        assert b.begin("k1", "idem-2", "refund", "cc") is None
    finally:
        a.close()
        b.close()


def test_a_claim_left_by_a_dead_replica_is_taken_over_after_it_goes_stale(db_url: str) -> None:
    keys = KeyStore(db_url)
    try:
        keys.begin("k1", "idem", "refund", "aa")
        db = open_database(db_url, NAMESPACE)
        try:
            db.execute("UPDATE idempotency SET started_at = ?", (time.time() - STALE_AFTER - 1,))
        finally:
            db.close()
        assert keys.begin("k1", "idem", "refund", "aa") is None
        with pytest.raises(IdempotencyConflict):
            keys.begin("k1", "idem", "refund", "aa")  # and now it is this request's
    finally:
        keys.close()


def test_replicas_racing_on_one_idempotency_key_let_exactly_one_act(db_url: str) -> None:
    stores = [KeyStore(db_url) for _ in range(4)]
    claimed: list[int] = []
    refused: list[int] = []
    start = threading.Barrier(len(stores) * 4)

    def race(n: int) -> None:
        start.wait()
        try:
            if stores[n % len(stores)].begin("k1", "same", "deliver", "aa") is None:
                claimed.append(n)
        except IdempotencyConflict as conflict:
            refused.append(conflict.status)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(stores) * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    assert len(claimed) == 1 and refused == [409] * (len(threads) - 1)


def _receipt(gas: int, price: int, block: int) -> TxReceipt:
    return cast(TxReceipt, {"gasUsed": gas, "effectiveGasPrice": price, "blockNumber": block})


def test_the_ledger_records_each_transaction_once_and_sums_gas(db_url: str) -> None:
    store = SellerStore(db_url, namespace=NAMESPACE)  # the escrow tables the ledger reads beside its own
    ledger = Ledger(db_url)
    try:
        ledger.record_tx("deposit", b"\x01" * 32, _receipt(100, 3, 7), [b"\xaa" * 32], 5)
        ledger.record_tx("deposit", b"\x01" * 32, _receipt(100, 3, 7), [b"\xaa" * 32], 5)  # a retry: once
        ledger.record_tx("refund", b"\x02" * 32, _receipt(50, 2, 8), [b"\xaa" * 32], 5)
        figures = ledger.figures()
        assert figures.gas_wei_by_kind == {"deposit": 300, "refund": 100}
        assert [r["kind"] for r in figures.recent] == ["refund", "deposit"]
        assert ledger.queue_depths() == {"refund_pending": 0}
        assert ledger.amount_of([b"\xaa" * 32]) == 0  # no payment row for it
    finally:
        ledger.close()
        store.close()


def test_a_facilitator_and_a_seller_on_one_postgresql_url_keep_separate_tables(postgres_server: PostgresServer) -> None:
    db_url = postgres_server.fresh()  # schemas are PostgreSQL's: on SQLite each role has its own file
    seller = SellerStore(db_url)
    escrows = SellerStore(db_url, namespace=NAMESPACE)
    keys = KeyStore(db_url)
    try:
        facilitator_db = open_database(db_url, NAMESPACE)
        seller_db = open_database(db_url, "seller")
        try:
            assert {"payments", "api_keys", "idempotency", "facilitator_txs"} <= facilitator_db.tables()
            assert "payments" in seller_db.tables() and "api_keys" not in seller_db.tables()
            facilitator_db.execute("INSERT INTO leases (name, owner, expires_at) VALUES ('x', 'facilitator', 0)", ())
            assert seller_db.all("SELECT * FROM leases") == []
        finally:
            facilitator_db.close()
            seller_db.close()
    finally:
        keys.close()
        escrows.close()
        seller.close()


def test_migrate_names_the_facilitator_role(db_url: str, capsys: Any) -> None:
    from escrow_py.cli import main

    assert main(["migrate", "--db", db_url, "--role", "facilitator"]) == 0
    out = capsys.readouterr().out
    assert '"store": "seller"' in out and '"store": "facilitator"' in out
    keys = KeyStore(db_url)  # opens on the migrated tables without applying anything again
    try:
        assert keys.list() == []
    finally:
        keys.close()


def _age(db_url: str, idempotency_key: str, seconds: float) -> None:
    db = open_database(db_url, NAMESPACE)
    try:
        db.execute(
            "UPDATE idempotency SET started_at = started_at - ? WHERE idempotency_key = ?", (seconds, idempotency_key)
        )
    finally:
        db.close()


def test_prune_removes_idempotency_records_past_the_window_and_keeps_what_a_replay_needs(
    db_url: str, capsys: Any
) -> None:
    from escrow_py.cli import main

    keys = KeyStore(db_url)
    try:
        for claim in ("old", "new", "old-unanswered", "in-flight"):
            assert keys.begin("k1", claim, "deliver", "aa") is None
        keys.finish("k1", "old", 202, {"deliveries": ["old"]})
        keys.finish("k1", "new", 202, {"deliveries": ["new"]})
        _age(db_url, "old", 7200)
        _age(db_url, "old-unanswered", 7200)  # a request that died with its replica, long ago
        assert main(["prune", "--db", db_url, "--role", "facilitator", "--grace", "3600"]) == 0
        out = capsys.readouterr().out
        assert '"idempotency": 2' in out, out
        # Within the window: the replay gets its recorded answer, the running request is still running.
        recorded = keys.begin("k1", "new", "deliver", "aa")
        assert recorded is not None and recorded.body == {"deliveries": ["new"]}
        with pytest.raises(IdempotencyConflict) as running:
            keys.begin("k1", "in-flight", "deliver", "aa")
        assert running.value.status == 409
        # Past it: forgotten, so the key is claimed afresh (the actions behind it are idempotent by escrow id).
        assert keys.begin("k1", "old", "deliver", "bb") is None
        # A window of 0 forgets every answered record, but never a claim whose request may still be running.
        assert keys.prune(before=time.time() + 1) == {"idempotency": 1, "rate_limits": 0}  # "new"
        for claim in ("in-flight", "old"):
            with pytest.raises(IdempotencyConflict):
                keys.begin("k1", claim, "deliver", "aa")
    finally:
        keys.close()


def test_prune_forgets_only_rate_limit_rows_whose_bucket_is_full_again(db_url: str) -> None:
    keys = KeyStore(db_url)
    try:
        assert keys.take("idle", rate=1000.0, burst=1) == 0.0
        assert keys.take("busy", rate=0.01, burst=1) == 0.0
        time.sleep(0.05)  # "idle" refilled long ago (1 ms), "busy" in 100 s
        assert keys.prune(before=0.0)["rate_limits"] == 1
        assert keys.take("busy", rate=0.01, burst=1) > 90  # its spent burst survived the prune
    finally:
        keys.close()
