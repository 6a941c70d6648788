"""The seller store's shared-state rules, on SQLite and PostgreSQL: what several replicas rely on.

Each test opens several SellerStore instances on one database (as replicas do) and races them
from threads: claims are exclusive until they lapse, a stored response is never overwritten,
the operator key's nonces are never handed out twice.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures.chain import Chain
from helpers import OPERATOR, STRANGER, address, dev, make_terms
from web3.types import RPCEndpoint

from escrow_py.chain.tx import SentTx, TxSender
from escrow_py.protocol.errors import InsufficientFunds
from escrow_py.seller import SellerStore, StoredResponse
from escrow_py.seller._store import PaymentStatus

KEY = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"


def test_a_lease_is_held_by_one_owner_until_it_lapses_or_is_released(db_url: str) -> None:
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        assert a.take_lease("payment:0x01", "replica-a", 0.5)
        assert not b.take_lease("payment:0x01", "replica-b", 0.5)  # another replica: refused while live
        assert a.take_lease("payment:0x01", "replica-a", 0.5)  # the holder renews
        deadline = time.monotonic() + 10
        while not b.take_lease("payment:0x01", "replica-b", 30):  # the holder stopped renewing: it lapses
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.05)
        assert not a.take_lease("payment:0x01", "replica-a", 30)  # the old holder cannot take it back
        holder = a.lease_holder("payment:0x01")
        assert holder is not None and holder[0] == "replica-b"
        a.release_lease("payment:0x01", "replica-a")  # not the holder: nothing happens
        assert not a.take_lease("payment:0x01", "replica-a", 30)
        b.release_lease("payment:0x01", "replica-b")
        assert a.take_lease("payment:0x01", "replica-a", 30)
    finally:
        a.close()
        b.close()


def test_racing_replicas_get_one_claim(db_url: str) -> None:
    stores = [SellerStore(db_url) for _ in range(4)]
    try:
        start = threading.Barrier(16)

        def race(n: int) -> bool:
            start.wait()
            return stores[n % 4].take_lease("payment:0x02", f"owner-{n}", 30)

        with ThreadPoolExecutor(16) as pool:
            won = list(pool.map(race, range(16)))
        assert won.count(True) == 1
    finally:
        for store in stores:
            store.close()


def test_a_stored_response_is_never_overwritten(chain: Chain, db_url: str) -> None:
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        terms = make_terms(chain)
        escrow_id = os.urandom(32)
        assert a.begin_deposit(escrow_id, terms, 1)
        assert not b.begin_deposit(escrow_id, terms, 1)  # the id is recorded once
        a.set_held(escrow_id, None)
        first = StoredResponse(200, [(b"content-type", b"text/plain")], b"first run")
        second = StoredResponse(200, [(b"content-type", b"text/plain")], b"second run")
        assert not a.answered(escrow_id)
        assert a.save_served(escrow_id, terms, first, b"\x01" * 32)
        assert not b.save_served(escrow_id, terms, second, b"\x02" * 32)
        assert not b.save_failed(escrow_id, StoredResponse(500, [], b"boom"), None)
        payment = b.payment(escrow_id)
        assert payment is not None and payment.response == first and payment.status == PaymentStatus.SERVED
        record = b.delivery(escrow_id)
        assert record is not None and record.delivery_hash == b"\x01" * 32  # the queued hash is the stored bytes'
        assert b.answered(escrow_id)
    finally:
        a.close()
        b.close()


def test_a_holder_whose_claim_was_taken_over_writes_nothing(chain: Chain, db_url: str) -> None:
    """The stalled holder's save comes first (the one that took over is still in its handler): refused all
    the same, since its claim is gone; the live holder's answer is then stored and its claim released."""
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        terms = make_terms(chain)
        escrow_id = os.urandom(32)
        claim = f"payment:0x{escrow_id.hex()}"
        assert a.begin_deposit(escrow_id, terms, 1)
        a.set_held(escrow_id, None)
        assert a.take_lease(claim, "stalled", 0.2)
        deadline = time.monotonic() + 10
        while not b.take_lease(claim, "live", 30):  # the stalled holder's lease lapses; b takes it over
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.05)
        stalled = StoredResponse(200, [], b"the stalled run")
        assert not a.save_served(escrow_id, terms, stalled, b"\x01" * 32, release=(claim, "stalled"))
        assert not a.save_failed(escrow_id, StoredResponse(502, [], b"x"), None, release=(claim, "stalled"))
        assert not a.answered(escrow_id) and a.delivery(escrow_id) is None
        assert a.lease_holder(claim) is not None  # and the live holder's claim is untouched
        live = StoredResponse(200, [], b"the live run")
        assert b.save_served(escrow_id, terms, live, b"\x02" * 32, release=(claim, "live"))
        payment = a.payment(escrow_id)
        assert payment is not None and payment.response == live
        assert a.lease_holder(claim) is None
    finally:
        a.close()
        b.close()


def test_a_renewal_extends_only_the_leases_still_held_and_never_takes_one_back(db_url: str) -> None:
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        assert a.take_lease("payment:0x0a", "a1", 0.2)
        assert a.take_lease("payment:0x0b", "a2", 30)
        assert a.take_lease("payment:0x0c", "a3", 30)
        a.release_lease("payment:0x0c", "a3")
        deadline = time.monotonic() + 10
        while not b.take_lease("payment:0x0a", "b1", 30):
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.05)
        held = a.lease_holder("payment:0x0b")
        assert held is not None
        renewed = a.renew_leases([("payment:0x0a", "a1"), ("payment:0x0b", "a2"), ("payment:0x0c", "a3")], 60)
        assert renewed == {("payment:0x0b", "a2")}
        after = a.lease_holder("payment:0x0b")
        assert after is not None and after[1] > held[1] + 20
        assert a.lease_holder("payment:0x0c") is None  # a released lease stays released
        holder = a.lease_holder("payment:0x0a")
        assert holder is not None and holder[0] == "b1"
        assert a.renew_leases([], 60) == set()
    finally:
        a.close()
        b.close()


def test_a_replica_whose_clock_runs_fast_cannot_take_a_live_claim(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lease expiry is judged by the database's clock: a replica an hour ahead still waits for the lease."""
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        assert a.take_lease("payment:0x0d", "honest", 30)
        ahead = time.time() + 3600
        monkeypatch.setattr(time, "time", lambda: ahead)
        assert not b.take_lease("payment:0x0d", "fast-clock", 30)
        assert b.renew_leases([("payment:0x0d", "fast-clock")], 30) == set()
    finally:
        a.close()
        b.close()


def test_nonces_from_many_stores_at_once_are_distinct_and_contiguous(db_url: str) -> None:
    stores = [SellerStore(db_url) for _ in range(4)]
    try:
        start = threading.Barrier(8)

        def allocate(n: int) -> list[int]:
            start.wait()
            return [stores[n % 4].allocate_nonce(KEY, 7) for _ in range(25)]

        with ThreadPoolExecutor(8) as pool:
            taken = [nonce for batch in pool.map(allocate, range(8)) for nonce in batch]
        assert sorted(taken) == list(range(7, 207))
        # The node's count ahead of the book (the key used elsewhere): the book follows it.
        assert stores[0].allocate_nonce(KEY, 500) == 500
        assert stores[1].allocate_nonce(KEY, 0) == 501
        # A nonce whose transaction never left is given back only while it is the latest one taken.
        assert not stores[2].give_back_nonce(KEY, 500)
        assert stores[2].give_back_nonce(KEY, 501)
        assert stores[3].allocate_nonce(KEY, 0) == 501
        # After a reorg dropped transactions the counter moves back to the chain's.
        stores[0].lower_nonce(KEY, 420)
        assert stores[1].allocate_nonce(KEY, 0) == 420
    finally:
        for store in stores:
            store.close()


def test_transactions_are_found_by_intent(db_url: str) -> None:
    store = SellerStore(db_url)
    try:
        first = SentTx(b"\x0a" * 32, 3, {}, b"\x01\x02", intent="0xabc")
        bumped = SentTx(b"\x0b" * 32, 3, {}, b"\x01\x03", intent="0xabc")
        store.record_tx(KEY, first)
        time.sleep(0.01)
        store.record_tx(KEY, bumped)
        store.record_tx(KEY, bumped)  # recorded again (a retry): still one row
        store.record_tx(KEY, SentTx(b"\x0c" * 32, 4, {}, b"\x05", intent="0xdef"))
        assert store.txs_for(KEY, "0xabc") == [b"\x0b" * 32, b"\x0a" * 32]
        assert store.txs_for("0x0000000000000000000000000000000000000001", "0xabc") == []
    finally:
        store.close()


def test_senders_on_one_book_never_send_one_intent_twice_nor_reuse_a_nonce(chain: Chain, tmp_path: Path) -> None:
    """Two processes' TxSenders on one book (automine off, so the first stays pending): the second one
    asked for the same call waits for the first instead of sending it again; another call gets the next nonce."""
    store = SellerStore(tmp_path / "seller.sqlite")
    first, second = TxSender(chain.w3, dev(OPERATOR), book=store), TxSender(chain.w3, dev(OPERATOR), book=store)
    operator = address(OPERATOR)
    before = chain.w3.eth.get_transaction_count(operator)
    chain.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [False])
    try:
        sent = first.send(address(STRANGER), b"\x01")
        with ThreadPoolExecutor(2) as pool:
            again = pool.submit(second.transact, address(STRANGER), b"\x01", timeout=30)
            other = second.send(address(STRANGER), b"\x02")  # a different intent: a nonce of its own
            time.sleep(0.5)
            assert not again.done()  # waiting for the first one, not sending its own
            chain.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
            receipt = again.result(30)
        assert bytes(receipt["transactionHash"]) == sent.tx_hash
        assert other.nonce == sent.nonce + 1 == before + 1
        assert chain.w3.eth.get_transaction_count(operator) == before + 2  # two transactions, not three
        assert store.txs_for(operator, sent.intent) == [sent.tx_hash]
    finally:
        chain.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [True])
        store.close()


def test_a_refused_broadcast_gives_its_nonce_back_to_the_book(chain: Chain, tmp_path: Path) -> None:
    """The node refuses the transaction (the key cannot pay for gas): the nonce never left, so the
    next transaction of any process on the book takes it, and no gap holds the key's queue back; the refused
    transaction's record goes too."""
    store = SellerStore(tmp_path / "seller.sqlite")
    sender = TxSender(chain.w3, dev(STRANGER), book=store)
    stranger = address(STRANGER)
    first = chain.w3.eth.get_transaction_count(stranger)
    chain.w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [stranger, "0x0"])
    try:
        with pytest.raises(InsufficientFunds):
            sender.send(address(OPERATOR), b"", gas=21_000)
        assert store.allocate_nonce(stranger, 0) == first  # given back: the next one takes it
        # Nor left in the book, where a poster taking the key's lease over would send it once the key had gas money.
        assert store.unmined(stranger, 0) == []
    finally:
        store.close()


def test_replicas_serving_first_at_once_never_pass_the_buyers_limit(chain: Chain, db_url: str) -> None:
    """The exposure check and the insert are one step for every replica on the store (both engines)."""
    stores = [SellerStore(db_url) for _ in range(4)]
    try:
        terms = make_terms(chain)
        start = threading.Barrier(16)

        def race(n: int) -> str | None:
            start.wait()
            return stores[n % 4].begin_serve_first(
                os.urandom(32), terms, accepted_at=1, route="GET /q", payload="{}", due=terms.deadline,
                max_per_buyer=3 * terms.amount, max_total=100 * terms.amount,
            )  # fmt: skip

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(race, range(16)))
        assert outcomes.count(None) == 3 and outcomes.count("serve_first_limit") == 13
        assert stores[1].exposure(terms.buyer) == 3 * terms.amount
    finally:
        for store in stores:
            store.close()


def test_a_served_first_answer_is_stored_once_and_a_loss_refuses_the_buyer(chain: Chain, db_url: str) -> None:
    a, b = SellerStore(db_url), SellerStore(db_url)
    try:
        terms = make_terms(chain)
        escrow_id = os.urandom(32)
        limits = {"due": terms.deadline, "max_per_buyer": 10 * terms.amount, "max_total": 10 * terms.amount}
        assert a.begin_serve_first(escrow_id, terms, accepted_at=1, route=None, payload="{}", **limits) is None
        assert b.begin_serve_first(escrow_id, terms, accepted_at=1, route=None, payload="{}", **limits) == "known"
        first = StoredResponse(200, [], b"first run")
        assert a.take_lease("payment:sf", "a", 30)
        assert not b.forget_serve_first(escrow_id, release=("payment:sf", "b"))  # not b's claim: kept
        assert a.save_served_first(escrow_id, first, b"\x01" * 32)
        assert not b.save_served_first(escrow_id, StoredResponse(200, [], b"second run"), b"\x02" * 32)
        payment = b.payment(escrow_id)
        assert payment is not None and payment.serve_first and payment.response == first
        (queued,) = b.settlements_due()
        assert (queued.escrow_id, queued.delivery_hash) == (escrow_id, b"\x01" * 32)
        b.mark_lost(escrow_id, "authorization_used", refuse_buyer=True)
        b.mark_lost(escrow_id, "authorization_used", refuse_buyer=True)  # the refusal is recorded once
        losses = a.losses()
        assert (losses.count, losses.amount, losses.refused_buyers) == (1, terms.amount, frozenset({terms.buyer}))
        again = a.begin_serve_first(os.urandom(32), terms, accepted_at=1, route=None, payload="{}", **limits)
        assert again == "serve_first_refused"
    finally:
        a.close()
        b.close()
