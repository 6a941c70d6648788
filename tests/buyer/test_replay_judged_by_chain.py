"""A replay is judged by the hash the chain holds once the delivery is posted, not by the answer's header.

The lie: a replica that re-runs the handler answers the replay with other bytes and a PAYMENT-RESPONSE
whose delivery hash is the hash of those bytes; the chain holds the hash of what was served first.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, deposit, dev, make_terms
from x402.schemas import SettleResponse

from escrow_py.buyer import BuyerSettings, DeliveryMismatch, PaymentState
from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._journal import JournalEntry, PaymentRow
from escrow_py.protocol.terms import Terms, delivery_hash
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, SettlementExtra, encode_payment_response

FIRST, OTHER = b'{"report": "the one served and posted"}', b'{"report": "a second handler run"}'


def _answer(body: bytes, extra: SettlementExtra) -> httpx.Response:
    settle = SettleResponse(success=True, transaction="", network="eip155:84532", payer=address(BUYER),
                            extra=extra.to_json())  # fmt: skip
    return httpx.Response(200, content=body, headers={PAYMENT_RESPONSE_HEADER: encode_payment_response(settle)})


def _paid(chain: Chain, core: PaymentCore) -> tuple[Terms, bytes, bytes]:
    """A journaled payment, deposited, its delivery of FIRST posted on chain; returns terms, id, delivery tx."""
    terms = make_terms(chain, window=600)
    deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    core.journal.record(PaymentRow(escrow_id=escrow_id, chain_id=84532, escrow=chain.escrow.address, method="GET",
                                   url="http://shop.test/report", headers={}, body=b"", terms=terms,
                                   valid_before=terms.deadline, payment_header="x"))  # fmt: skip
    receipt = chain.escrow.deliver(chain.sender(SELLER), terms, delivery_hash(FIRST))
    return terms, escrow_id, bytes(receipt["transactionHash"])


def _paid_entry(core: PaymentCore, escrow_id: bytes) -> JournalEntry:
    entry = core.journal.get(escrow_id)
    assert entry is not None
    return entry


@pytest.fixture
def core(chain: Chain, db_url: str) -> Iterator[PaymentCore]:
    """The buyer's core on a journal of each engine."""
    paying = PaymentCore(BuyerSettings(dev(BUYER), chain.node.url, db_url))
    try:
        yield paying
    finally:
        paying.journal.close()


@pytest.mark.parametrize("pointer", ["delivery transaction", "replay, no pointer"])
def test_a_replay_with_other_bytes_is_a_mismatch_against_the_chain(
    chain: Chain, core: PaymentCore, pointer: str
) -> None:
    terms, escrow_id, tx = _paid(chain, core)
    extra = SettlementExtra(escrow_id=escrow_id, deadline=terms.deadline, delivery_hash=delivery_hash(OTHER),
                            delivery_transaction=tx if pointer == "delivery transaction" else None)  # fmt: skip
    with pytest.raises(DeliveryMismatch) as caught:
        core.settle(_paid_entry(core, escrow_id), _answer(OTHER, extra), replay=True)
    assert caught.value.committed == delivery_hash(FIRST)  # the chain's word, not the header's
    entry = core.journal.get(escrow_id)
    assert entry is not None and entry.state is PaymentState.MISMATCH
    assert entry.committed_hash == delivery_hash(FIRST) and entry.response_hash == delivery_hash(OTHER)


def test_a_replay_with_the_posted_bytes_is_delivered(chain: Chain, core: PaymentCore) -> None:
    terms, escrow_id, tx = _paid(chain, core)
    extra = SettlementExtra(
        escrow_id=escrow_id, deadline=terms.deadline, delivery_hash=delivery_hash(FIRST), delivery_transaction=tx
    )
    core.settle(_paid_entry(core, escrow_id), _answer(FIRST, extra), replay=True)
    entry = core.journal.get(escrow_id)
    assert entry is not None and entry.state is PaymentState.DELIVERED
