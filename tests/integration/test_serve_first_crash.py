"""Serve-first survives a SIGKILL of the seller: the settlement queued before the answer is sent after restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev

from escrow_devtools.anvil import free_port
from escrow_devtools.demo._shop import REPORT_PRICE
from escrow_py.buyer import PaymentState, RecoveryAction, recover
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.seller import SellerStore

from .world import Books, SellerProcess, buy_from_a_seller_that_dies


def _until(what: str, done: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_seller_killed_after_serving_first_settles_after_restart(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    store, journal, port = tmp_path / "seller.sqlite", tmp_path / "buyer.sqlite", free_port()
    escrow_id = buy_from_a_seller_that_dies(chain, store, journal, port, "--serve-first")
    # Served and stored, the settlement queued, nothing sent: the buyer's authorization is unused.
    queued = SellerStore(store).settlements_due()
    assert [q.escrow_id for q in queued] == [escrow_id]
    assert not chain.token.authorization_state(address(BUYER), escrow_id)
    assert chain.escrow.state_of(escrow_id) is State.NONE
    books.check()
    seller_before = chain.token.balance_of(address(SELLER))

    restarted = SellerProcess(chain, store, port, "--serve-first")
    try:
        _until("the restarted seller's settleMany", lambda: chain.token.authorization_state(address(BUYER), escrow_id))
        settled = chain.escrow.settlement_of(escrow_id, since=0)
        assert settled is not None and settled.delivery_hash == queued[0].delivery_hash
        assert chain.token.balance_of(address(SELLER)) == seller_before + REPORT_PRICE
        books.check()
        report = recover(journal, dev(BUYER), chain.node.url)
    finally:
        restarted.stop()
    (item,) = report.items
    # The buyer never saw the answer: recover() replays it and checks the bytes against the settled hash.
    assert (item.action, item.journal_state) == (RecoveryAction.REPLAYED, PaymentState.DELIVERED), item.outcome
    assert item.body is not None and delivery_hash(item.body) == queued[0].delivery_hash
    assert json.loads(item.body)["item"] == "crash"
    record = SellerStore(store).settlement(escrow_id)
    assert record is not None and record.status == "settled"
    books.check()
