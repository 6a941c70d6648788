"""A poster that takes the operator key's lease over from one that died finishes what the dead one left in flight,
at the nonce it was signed with: sent again if it never left, repriced (a fee bump, same nonce) if it is stuck in
the pool; never a second transaction for the same deliveries. Real store (both engines), real anvil and contracts.

The dead poster is played step by step: it takes the lease, signs a deliverMany of the pending deliveries and
records it in the store (as every transaction is, before broadcast), and then stops, before or after broadcasting.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_typing import ChecksumAddress
from fixtures.chain import Chain
from helpers import SELLER, deposit, make_terms, no_automine, pending_of, rpc, until
from hexbytes import HexBytes

from escrow_py.chain.tx import SentTx
from escrow_py.protocol.terms import State
from escrow_py.seller import PostReport, SellerStore, StoredResponse
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._config import SellerConfig
from escrow_py.seller._poster import BATCH_SIZE, DeliveryPoster
from escrow_py.seller._store import DeliveryStatus

from .shop import make_config

LEASE = 1.0


@dataclass
class Scene:
    chain: Chain
    store: SellerStore  # the survivor's
    poster: DeliveryPoster  # the survivor
    config: SellerConfig
    ids: list[bytes]
    operator: ChecksumAddress


def _serve(chain: Chain, store: SellerStore) -> bytes:
    """One Held escrow (deposited from the seller's own key, so the operator's nonces are the posters' alone) whose
    response is stored and delivery queued."""
    terms = make_terms(chain, window=3600)
    receipt = deposit(chain, terms, submitter=SELLER)
    escrow_id = chain.escrow.id_of(terms)
    assert store.begin_deposit(escrow_id, terms, 0)
    store.set_held(escrow_id, bytes(receipt["transactionHash"]))
    assert store.save_served(escrow_id, terms, StoredResponse(200, [], b"served"), os.urandom(32))
    return escrow_id


@pytest.fixture
def scene(chain: Chain, db_url: str) -> Iterator[Scene]:
    config = make_config(chain, db_url, reprice_after=1.0, tx_timeout=60, poster_lease=LEASE)
    store = SellerStore(db_url)
    survivor = seller_chain(config, chain.w3, book=store)
    try:
        ids = [_serve(chain, store) for _ in range(2)]
        yield Scene(chain, store, DeliveryPoster(survivor, store, lease=LEASE, owner="survivor"), config, ids,
                    survivor.sender_address)  # fmt: skip
    finally:
        store.close()


def _dies_holding_the_lease(scene: Scene, db_url: str, *, broadcast: bool) -> SentTx:
    """The dead poster's last acts: the lease, a deliverMany of the pending deliveries signed and recorded, maybe
    broadcast; then nothing (its store closed, no renewal, no confirmation)."""
    store = SellerStore(db_url)
    try:
        dead = seller_chain(scene.config, scene.chain.w3, book=store)
        assert store.take_lease(scene.poster.lease_name, "dead", LEASE)
        pending = store.pending_deliveries(BATCH_SIZE)
        assert sorted(p.escrow_id for p in pending) == sorted(scene.ids)
        data = scene.chain.escrow.deliver_many_data([(p.terms, p.delivery_hash) for p in pending])
        signed = dead.sender.sign(scene.chain.escrow.address, data)
        store.record_tx(dead.sender.address, signed)
        if broadcast:
            dead.sender.broadcast_raw(signed.raw)
        return signed
    finally:
        store.close()


def _takes_over(scene: Scene) -> PostReport:
    """Passes of the survivor until one holds the lease (the dead poster's lapses after LEASE seconds)."""
    report: PostReport = until(
        "the survivor's pass with the lease", lambda: (r := scene.poster.post_pending()).posted and r
    )
    return report


def test_a_transaction_signed_and_never_broadcast_is_sent_as_it_was(scene: Scene, db_url: str) -> None:
    """The dead poster recorded its deliverMany and died before broadcasting it. The survivor broadcasts that very
    transaction (same hash, same nonce), then posts what was queued since in a transaction of its own: one
    transaction per batch, none carrying the first batch's deliveries again."""
    chain, store = scene.chain, scene.store
    before = chain.w3.eth.get_transaction_count(scene.operator)
    signed = _dies_holding_the_lease(scene, db_url, broadcast=False)
    assert signed.nonce == before == chain.w3.eth.get_transaction_count(scene.operator, "pending")  # never sent
    later = _serve(chain, store)  # queued after the dead poster signed its batch

    report = _takes_over(scene)
    if later not in report.posted:
        report = scene.poster.post_pending()  # the third one may go in the next pass

    for escrow_id in scene.ids:
        record = store.delivery(escrow_id)
        assert record is not None and (record.status, record.tx_hash) == (DeliveryStatus.POSTED, signed.tx_hash)
        assert chain.escrow.state_of(escrow_id) == State.RELEASED
    third = store.delivery(later)
    assert third is not None and third.status == DeliveryStatus.POSTED and third.tx_hash != signed.tx_hash
    assert third.tx_hash is not None
    mined = chain.w3.eth.get_transaction(HexBytes(third.tx_hash))
    assert int(mined["nonce"]) == signed.nonce + 1
    payment = store.payment(later)
    assert payment is not None
    # That one carries only the later delivery, not the first batch again.
    assert bytes(mined["input"]) == chain.escrow.deliver_many_data([(payment.terms, third.delivery_hash)])
    assert chain.w3.eth.get_transaction_count(scene.operator) == before + 2  # two transactions, no gap filler


def test_a_transaction_stuck_in_the_pool_is_repriced_at_its_nonce(scene: Scene, db_url: str) -> None:
    """The dead poster broadcast its deliverMany and died while it waited in the pool (no block mined). The survivor
    replaces it with a fee bump at the same nonce (recorded first, as every transaction); once a block is mined
    the replacement delivers both, and the key has used one nonce."""
    chain, store = scene.chain, scene.store
    before = chain.w3.eth.get_transaction_count(scene.operator)
    with no_automine(chain):
        signed = _dies_holding_the_lease(scene, db_url, broadcast=True)
        assert [int(t["nonce"], 16) for t in pending_of(chain, scene.operator)] == [signed.nonce]
        result: list[PostReport] = []
        survivor = threading.Thread(target=lambda: result.append(_takes_over(scene)), daemon=True)
        survivor.start()
        original = "0x" + signed.tx_hash.hex()

        def bumped_in_pool() -> bool:
            pool = pending_of(chain, scene.operator)
            return [int(t["nonce"], 16) for t in pool] == [signed.nonce] and pool[0]["hash"] != original

        try:
            until("a fee-bumped version of it in the pool, at its nonce", bumped_in_pool)
        finally:  # a block either way, so the survivor's pass ends before its store is closed
            rpc(chain, "evm_mine", [])
            survivor.join(60)
    assert result, "the survivor's pass did not finish"
    assert sorted(result[0].posted) == sorted(scene.ids)
    records = [store.delivery(escrow_id) for escrow_id in scene.ids]
    assert all(r is not None and r.status == DeliveryStatus.POSTED for r in records)
    mined = {r.tx_hash for r in records if r is not None}
    assert len(mined) == 1 and signed.tx_hash not in mined
    bumped = mined.pop()
    assert bumped is not None and bumped in store.txs_for(scene.operator, signed.intent)  # recorded before it left
    assert int(chain.w3.eth.get_transaction(HexBytes(bumped))["nonce"]) == signed.nonce
    assert chain.w3.eth.get_transaction_count(scene.operator) == before + 1
