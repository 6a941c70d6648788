"""X402Escrow.deliver: release to the seller strictly before the deadline, by the seller's side only."""

from __future__ import annotations

import pytest
from fixtures.chain import BUYER, OPERATOR, SELLER, STRANGER, Chain
from helpers import address, clock_at, deposit, expect_revert, make_terms, send_at

from escrow_py.chain.escrow import Delivered
from escrow_py.protocol.errors import TransactionFailed
from escrow_py.protocol.terms import State, delivery_hash

BODY_HASH = delivery_hash(b'{"answer": 42}')


@pytest.mark.parametrize("who", [SELLER, OPERATOR])
def test_seller_or_operator_delivers_and_the_seller_is_paid(chain: Chain, who: int) -> None:
    terms = make_terms(chain, amount=77_000)
    deposit(chain, terms)
    seller_before = chain.token.balance_of(terms.seller)
    buyer_before = chain.token.balance_of(terms.buyer)
    operator_before = chain.token.balance_of(terms.operator)
    receipt = chain.escrow.deliver(chain.sender(who), terms, BODY_HASH)
    escrow_id = chain.escrow.id_of(terms)
    assert chain.escrow.state_of(escrow_id) is State.RELEASED
    assert chain.token.balance_of(terms.seller) == seller_before + 77_000
    assert chain.token.balance_of(terms.buyer) == buyer_before
    assert chain.token.balance_of(terms.operator) == operator_before
    assert chain.token.balance_of(chain.escrow.address) == 0
    events = chain.escrow.events_in(receipt)
    assert len(events) == 1 and isinstance(events[0], Delivered)
    assert events[0].id == escrow_id
    assert events[0].delivery_hash == BODY_HASH


@pytest.mark.parametrize("who", [STRANGER, BUYER])
def test_deliver_by_anyone_else_reverts(chain: Chain, who: int) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    with expect_revert("NotSellerOrOperator", caller=address(who), seller=terms.seller, operator=terms.operator):
        chain.escrow.deliver(chain.sender(who), terms, BODY_HASH)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_deliver_exactly_at_the_deadline_reverts(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    clock_at(chain, terms.deadline)
    with expect_revert("DeadlinePassed", deadline=terms.deadline, now_=terms.deadline):
        chain.escrow.deliver(chain.sender(SELLER), terms, BODY_HASH)


def test_deliver_after_the_deadline_reverts(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    clock_at(chain, terms.deadline + 50)
    with expect_revert("DeadlinePassed", deadline=terms.deadline, now_=terms.deadline + 50):
        chain.escrow.deliver(chain.sender(OPERATOR), terms, BODY_HASH)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_deliver_mined_at_the_deadline_fails_one_second_before_succeeds(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    with pytest.raises(TransactionFailed):
        send_at(chain, SELLER, chain.escrow.deliver_data(terms, BODY_HASH), terms.deadline)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD

    other = make_terms(chain, window=100)
    deposit(chain, other)
    send_at(chain, SELLER, chain.escrow.deliver_data(other, BODY_HASH), other.deadline - 1)
    assert chain.escrow.state_of(chain.escrow.id_of(other)) is State.RELEASED


def test_deliver_twice_reverts_not_held_released(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    chain.escrow.deliver(chain.sender(SELLER), terms, BODY_HASH)
    seller_after = chain.token.balance_of(terms.seller)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.RELEASED):
        chain.escrow.deliver(chain.sender(OPERATOR), terms, BODY_HASH)
    assert chain.token.balance_of(terms.seller) == seller_after


def test_deliver_after_refund_reverts_not_held_refunded(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    chain.escrow.refund(chain.sender(OPERATOR), terms)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.REFUNDED):
        chain.escrow.deliver(chain.sender(SELLER), terms, BODY_HASH)


def test_deliver_of_unknown_terms_reverts_not_held_none(chain: Chain) -> None:
    terms = make_terms(chain)
    with expect_revert("NotHeld", id=chain.escrow.id_of(terms), state=State.NONE):
        chain.escrow.deliver(chain.sender(SELLER), terms, BODY_HASH)


def test_deliver_with_altered_terms_reverts_not_held_none(chain: Chain) -> None:
    """Terms are the key: a seller claiming a larger amount names an escrow that does not exist."""
    terms = make_terms(chain, amount=10_000)
    deposit(chain, terms)
    inflated = terms.with_(amount=20_000)
    with expect_revert("NotHeld", id=chain.escrow.id_of(inflated), state=State.NONE):
        chain.escrow.deliver(chain.sender(SELLER), inflated, BODY_HASH)


def test_an_unset_delivery_hash_is_refused_and_the_funds_stay_held(chain: Chain) -> None:
    """A zero hash is a bug in the seller, not a delivery: nothing is released for it."""
    terms = make_terms(chain)
    deposit(chain, terms)
    with expect_revert("ZeroDeliveryHash", id=chain.escrow.id_of(terms)):
        chain.escrow.deliver(chain.sender(SELLER), terms, bytes(32))
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    assert chain.token.balance_of(terms.seller) == 0
