"""The seller store's schema 4 (ids, hashes and raw transactions as bytes, as the keeper's and the buyer's stores keep
them) carries over a store written by schemas 1-3, which kept them as 0x-hex text; on both engines.

The old rows are written with the SQL the store of schema 3 ran, so the test fails if a column is left as text,
a row is lost, or a value comes back other than the one written.
"""

from __future__ import annotations

import json
import time

import pytest

from escrow_py.chain.tx import SentTx
from escrow_py.cli import main
from escrow_py.protocol.terms import Terms
from escrow_py.seller import SellerStore, StoredResponse
from escrow_py.seller._store import MIGRATIONS, NAMESPACE, DeliveryStatus, PaymentStatus, SettleStatus, prune
from escrow_py.storage import migrate, open_database

KEY = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
BUYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def _terms(deadline: int, salt: int) -> Terms:
    return Terms(
        buyer=BUYER,
        seller="0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        operator=KEY,
        token="0x5FbDB2315678afecb367f032d93F642f64180aa3",
        amount=10_000,
        deadline=deadline,
        request_hash=b"\x01" * 32,
        salt=salt.to_bytes(32, "big"),
    )


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _write_schema_3(url: str, now: float, deadline: int) -> dict[str, bytes]:
    """A store as schema 3 left it: a served payment with its posted delivery, a served-first one with its queued
    settlement, a refused buyer, a signed transaction."""
    ids = {"served": b"\xaa" * 32, "first": b"\xbb" * 32}
    hashes = {"deposit": b"\xd0" * 32, "delivery": b"\xd1" * 32, "posted": b"\xd2" * 32, "settle": b"\xd3" * 32}
    raw = bytes(range(200))
    db = open_database(url, NAMESPACE)
    try:
        migrate(db, "seller", MIGRATIONS[:3])
        headers = json.dumps([[b"content-type".hex(), b"text/plain".hex()]])
        with db.transaction() as tx:
            for name, status in (("served", PaymentStatus.SERVED), ("first", PaymentStatus.SERVED_FIRST)):
                tx.execute(
                    "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, deposit_tx, refund_tx, "
                    "response_status, response_headers, response_body, created_at, updated_at, route, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?, NULL, 200, ?, ?, ?, ?, 'GET /x', NULL)",
                    (_hex(ids[name]), json.dumps(_terms(deadline, len(name)).to_json()), deadline, status,
                     int(now), _hex(hashes["deposit"]) if name == "served" else None, headers, name.encode(), now,
                     now),
                )  # fmt: skip
            tx.execute(
                "INSERT INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, tx_hash, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_hex(ids["served"]), json.dumps(_terms(deadline, 6).to_json()), _hex(hashes["delivery"]), deadline,
                 DeliveryStatus.POSTED, _hex(hashes["posted"]), now),
            )  # fmt: skip
            tx.execute(
                "INSERT INTO settlements (escrow_id, buyer, amount, payload, delivery_hash, due, status, updated_at, "
                "queued_at) VALUES (?, ?, 10000, '{}', ?, ?, ?, ?, ?)",
                (_hex(ids["first"]), BUYER, _hex(hashes["settle"]), deadline, SettleStatus.QUEUED, now, now),
            )
            tx.execute(
                "INSERT INTO refused_buyers (buyer, escrow_id, reason, at) VALUES (?, ?, 'expired', ?)",
                ("0x" + "ee" * 20, _hex(ids["first"]), now),
            )
            tx.execute(
                "INSERT INTO operator_txs (tx_hash, address, nonce, intent, raw, created_at) VALUES (?, ?, 7, ?, ?, ?)",
                (_hex(hashes["deposit"]), KEY, "0xabc", _hex(raw), now),
            )
    finally:
        db.close()
    return {**ids, **hashes, "raw": raw}


def test_a_store_of_schema_3_is_carried_over_to_bytes(db_url: str) -> None:
    now = time.time()
    deadline = int(now) + 3600
    old = _write_schema_3(db_url, now, deadline)
    store = SellerStore(db_url)  # applies schema 4 at start
    try:
        served = store.payment(old["served"])
        assert served is not None and served.status == PaymentStatus.SERVED and served.deposit_tx == old["deposit"]
        assert served.response == StoredResponse(200, [(b"content-type", b"text/plain")], b"served")
        assert served.terms == _terms(deadline, len("served"))
        assert store.answered(old["first"]) and not store.answered(b"\xcc" * 32)
        delivery = store.delivery(old["served"])
        assert delivery is not None and (delivery.delivery_hash, delivery.tx_hash) == (old["delivery"], old["posted"])
        assert [(p.escrow_id, p.tx_hash) for p in store.posted_unsettled()] == [(old["served"], old["posted"])]
        queued = store.settlements_due()
        assert [(q.escrow_id, q.delivery_hash) for q in queued] == [(old["first"], old["settle"])]
        assert store.losses().refused_buyers == frozenset({"0x" + "ee" * 20})
        assert store.txs_for(KEY, "0xabc") == [old["deposit"]]
        # Lookups by id and writes keyed by it meet the carried-over rows (a text id would match nothing).
        store.mark_final([old["served"]])
        assert store.posted_unsettled() == []
        assert not store.begin_deposit(old["served"], _terms(deadline, 9), int(now))  # the id is known
        store.record_tx(KEY, SentTx(b"\x0f" * 32, 8, {}, b"\x01", intent="0xabc"))
        assert store.txs_for(KEY, "0xabc")[0] == b"\x0f" * 32
        with store._db.read() as tx:
            (kind,) = tx.one("SELECT escrow_id FROM payments WHERE escrow_id = ?", (old["served"],)) or (None,)
            (raw,) = tx.one("SELECT raw FROM operator_txs WHERE tx_hash = ?", (old["deposit"],)) or (None,)
        assert bytes(kind) == old["served"] and bytes(raw) == old["raw"]
    finally:
        store.close()


def test_migrate_and_prune_commands_on_the_seller_store(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate` brings a schema-3 store to 4; `prune` removes a payment settled for good past the grace, and keeps
    one still unpaid."""
    past = int(time.time()) - 30 * 86_400
    old = _write_schema_3(db_url, past, past)
    assert main(["migrate", "--db", db_url, "--role", "seller"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["applied"], done["version"]) == ([4], 4)
    store = SellerStore(db_url)
    try:
        store.mark_final([old["served"]])  # its delivery is deep enough: nothing left to do for it
    finally:
        store.close()
    assert main(["prune", "--db", db_url, "--role", "seller", "--grace", "86400"]) == 0
    deleted = json.loads(capsys.readouterr().out)["deleted"]
    assert (deleted["payments"], deleted["deliveries"], deleted["settlements"], deleted["operator_txs"]) == (1, 1, 0, 1)
    store = SellerStore(db_url)
    try:
        assert store.payment(old["served"]) is None and store.delivery(old["served"]) is None
        assert store.payment(old["first"]) is not None  # its settlement is still queued: unpaid, kept
        assert [q.escrow_id for q in store.settlements_due()] == [old["first"]]
    finally:
        store.close()


def test_prune_keeps_what_is_not_settled_for_good(db_url: str) -> None:
    store = SellerStore(db_url)
    try:
        past = int(time.time()) - 30 * 86_400
        terms = _terms(past, 1)
        assert store.begin_deposit(b"\x01" * 32, terms, past)
        store.set_held(b"\x01" * 32, b"\x02" * 32)
        assert store.save_served(b"\x01" * 32, terms, StoredResponse(200, [], b"x"), b"\x03" * 32)
        counts = prune(store._db, before=time.time())
        assert counts["payments"] == counts["deliveries"] == 0  # its delivery is pending: kept
        store.mark_deliveries([b"\x01" * 32], DeliveryStatus.POSTED, b"\x04" * 32)
        assert prune(store._db, before=time.time())["deliveries"] == 0  # posted, not final yet: kept
        store.mark_final([b"\x01" * 32])
        assert prune(store._db, before=past)["deliveries"] == 0  # not past the cut-off
        assert prune(store._db, before=time.time())["payments"] == 1
    finally:
        store.close()
