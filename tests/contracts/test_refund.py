"""X402Escrow.refund: to the buyer, by the seller's side at any time, by anyone at or after the deadline."""

from __future__ import annotations

import pytest
from fixtures.chain import BUYER, OPERATOR, SELLER, STRANGER, Chain
from helpers import address, clock_at, deposit, expect_revert, make_terms, send_at

from escrow_py.chain.escrow import Refunded
from escrow_py.protocol.errors import TransactionFailed
from escrow_py.protocol.terms import State, delivery_hash


def _assert_refunded(chain: Chain, terms_amount: int, buyer_before: int, buyer: str) -> None:
    assert chain.token.balance_of(buyer) == buyer_before + terms_amount
    assert chain.token.balance_of(chain.escrow.address) == 0


@pytest.mark.parametrize("who", [SELLER, OPERATOR])
def test_seller_or_operator_refunds_early_to_the_buyer(chain: Chain, who: int) -> None:
    terms = make_terms(chain, amount=55_000)
    deposit(chain, terms)
    buyer_before = chain.token.balance_of(terms.buyer)
    seller_before = chain.token.balance_of(terms.seller)
    receipt = chain.escrow.refund(chain.sender(who), terms)
    escrow_id = chain.escrow.id_of(terms)
    assert chain.escrow.state_of(escrow_id) is State.REFUNDED
    _assert_refunded(chain, 55_000, buyer_before, terms.buyer)
    assert chain.token.balance_of(terms.seller) == seller_before
    events = chain.escrow.events_in(receipt)
    assert len(events) == 1 and isinstance(events[0], Refunded)
    assert events[0].id == escrow_id
    assert events[0].caller == address(who)


@pytest.mark.parametrize("who", [STRANGER, BUYER])
def test_refund_before_the_deadline_by_anyone_else_reverts(chain: Chain, who: int) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    clock_at(chain, terms.deadline - 1)
    with expect_revert("RefundBeforeDeadline", deadline=terms.deadline, now_=terms.deadline - 1, caller=address(who)):
        chain.escrow.refund(chain.sender(who), terms)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_stranger_refunds_exactly_at_the_deadline(chain: Chain) -> None:
    terms = make_terms(chain, amount=31_000, window=100)
    deposit(chain, terms)
    buyer_before = chain.token.balance_of(terms.buyer)
    stranger_before = chain.token.balance_of(address(STRANGER))
    receipt = send_at(chain, STRANGER, chain.escrow.refund_data(terms), terms.deadline)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
    _assert_refunded(chain, 31_000, buyer_before, terms.buyer)
    assert chain.token.balance_of(address(STRANGER)) == stranger_before
    (event,) = chain.escrow.events_in(receipt)
    assert isinstance(event, Refunded) and event.caller == address(STRANGER)


def test_stranger_refund_mined_one_second_before_the_deadline_fails(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    with pytest.raises(TransactionFailed):
        send_at(chain, STRANGER, chain.escrow.refund_data(terms), terms.deadline - 1)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_buyer_refunds_itself_after_the_deadline(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    buyer_before = chain.token.balance_of(terms.buyer)
    clock_at(chain, terms.deadline + 1000)
    chain.escrow.refund(chain.sender(BUYER), terms)
    _assert_refunded(chain, terms.amount, buyer_before, terms.buyer)


def test_refund_twice_reverts_not_held_refunded(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    chain.escrow.refund(chain.sender(SELLER), terms)
    buyer_after = chain.token.balance_of(terms.buyer)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.REFUNDED):
        chain.escrow.refund(chain.sender(OPERATOR), terms)
    assert chain.token.balance_of(terms.buyer) == buyer_after


def test_refund_after_delivery_reverts_not_held_released(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.escrow.deliver(chain.sender(SELLER), terms, delivery_hash(b"x"))
    clock_at(chain, terms.deadline + 1)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.RELEASED):
        chain.escrow.refund(chain.sender(STRANGER), terms)


def test_refund_of_unknown_terms_reverts_not_held_none(chain: Chain) -> None:
    terms = make_terms(chain)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.NONE):
        chain.escrow.refund(chain.sender(SELLER), terms)


def test_refund_with_a_redirected_buyer_names_no_escrow(chain: Chain) -> None:
    """A refund cannot be redirected: changing the buyer changes the id."""
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    clock_at(chain, terms.deadline + 1)
    redirected = terms.with_(buyer=address(STRANGER))
    with expect_revert("NotHeld", id=chain.escrow.id_of(redirected), state=State.NONE):
        chain.escrow.refund(chain.sender(STRANGER), redirected)
