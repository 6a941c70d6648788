"""X402Escrow.deposit on a real anvil: every success path and every revert, with its values."""

from __future__ import annotations

import pytest
from fixtures.chain import BUYER, BUYER2, SELLER, STRANGER, Chain
from helpers import (
    address,
    cancel_authorization,
    clock_at,
    deposit,
    expect_revert,
    make_terms,
    send_at,
    sign_deposit,
)

from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.errors import TransactionFailed
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, State

ZERO = "0x0000000000000000000000000000000000000000"


def test_deposit_holds_the_funds_and_emits_every_term(chain: Chain) -> None:
    terms = make_terms(chain, amount=123_456)
    buyer_before = chain.token.balance_of(terms.buyer)
    receipt = deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    assert chain.escrow.state_of(escrow_id) is State.HELD
    assert chain.token.balance_of(chain.escrow.address) == 123_456
    assert chain.token.balance_of(terms.buyer) == buyer_before - 123_456
    assert chain.token.authorization_state(terms.buyer, escrow_id)
    events = chain.escrow.events_in(receipt)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Deposited)
    assert event.id == escrow_id
    assert event.terms == terms  # every one of the eight fields, decoded from the log
    assert event.at.block_number == receipt["blockNumber"]


def test_anyone_may_submit_the_buyers_signed_deposit(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms, submitter=STRANGER)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_deposit_returns_the_escrow_id(chain: Chain) -> None:
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms)
    returned = chain.sender(SELLER).call(chain.escrow.address, chain.escrow.deposit_data(terms, auth, sig))
    assert returned == chain.escrow.id_of(terms)


def test_deposit_of_zero_amount_reverts(chain: Chain) -> None:
    terms = make_terms(chain, amount=0)
    auth, sig = sign_deposit(chain, terms)
    with expect_revert("ZeroAmount") as caught:
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert caught.revert is not None and caught.revert.args_by_name == {}


def test_deposit_to_zero_seller_reverts(chain: Chain) -> None:
    terms = make_terms(chain).with_(seller=ZERO)
    auth, sig = sign_deposit(chain, terms)
    with expect_revert("ZeroSeller"):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_deposit_of_a_token_without_code_reverts(chain: Chain) -> None:
    no_code = address(STRANGER)
    terms = make_terms(chain, token=no_code)
    auth, sig = sign_deposit(chain, make_terms(chain))  # any well-formed signature: the check comes first
    with expect_revert("NotAContract", token=no_code):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_deposit_exactly_at_the_deadline_reverts(chain: Chain) -> None:
    now = chain.now()
    terms = make_terms(chain, deadline=now + 10)
    auth, sig = sign_deposit(chain, terms, valid_before=now + 1000)
    clock_at(chain, now + 10)  # the window is closed at the deadline itself
    with expect_revert("DeadlinePassed", deadline=now + 10, now_=now + 10):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_deposit_mined_exactly_at_the_deadline_fails_and_one_second_before_succeeds(chain: Chain) -> None:
    now = chain.now()
    late = make_terms(chain, deadline=now + 10)
    auth, sig = sign_deposit(chain, late, valid_before=now + 1000)
    with pytest.raises(TransactionFailed, match="failed"):
        send_at(chain, SELLER, chain.escrow.deposit_data(late, auth, sig), now + 10)
    assert chain.escrow.state_of(chain.escrow.id_of(late)) is State.NONE
    now = chain.now()
    on_time = make_terms(chain, deadline=now + 10)
    auth, sig = sign_deposit(chain, on_time, valid_before=now + 1000)
    send_at(chain, SELLER, chain.escrow.deposit_data(on_time, auth, sig), now + 9)
    assert chain.escrow.state_of(chain.escrow.id_of(on_time)) is State.HELD


def test_deposit_with_deadline_in_the_past_reverts(chain: Chain) -> None:
    now = chain.now()
    terms = make_terms(chain, deadline=now - 1)
    auth, sig = sign_deposit(chain, terms, valid_before=now + 1000)
    with expect_revert("DeadlinePassed", deadline=now - 1):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_deposit_with_deadline_too_far_reverts_with_the_max(chain: Chain) -> None:
    now = chain.now()
    deadline = now + MAX_DEADLINE_WINDOW + 3600
    terms = make_terms(chain, deadline=deadline)
    auth, sig = sign_deposit(chain, terms)
    with expect_revert("DeadlineTooFar", deadline=deadline) as caught:
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert caught.revert is not None
    # The simulated block's time is the chain's clock, give or take the seconds this test took.
    block_time = caught.revert.args_by_name["maxDeadline"] - MAX_DEADLINE_WINDOW
    assert now <= block_time <= now + 30
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.NONE


def test_deposit_at_exactly_the_max_window_succeeds(chain: Chain) -> None:
    now = chain.now()
    block_time = now + 5
    terms = make_terms(chain, deadline=block_time + MAX_DEADLINE_WINDOW)
    auth, sig = sign_deposit(chain, terms)
    chain.set_next_timestamp(block_time)
    sender = chain.sender(SELLER)
    sent = sender.send(chain.escrow.address, chain.escrow.deposit_data(terms, auth, sig), gas=300_000)
    receipt = sender.wait(sent.tx_hash)
    assert chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == block_time
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_signature_by_another_key_reverts(chain: Chain) -> None:
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms, signer=chain.signer(STRANGER))
    with expect_revert("InvalidSignature", authorizer=terms.buyer):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.NONE


def test_terms_altered_after_signing_revert(chain: Chain) -> None:
    terms = make_terms(chain, amount=10_000)
    auth, sig = sign_deposit(chain, terms)
    altered = [
        terms.with_(amount=10_001),
        terms.with_(seller=address(STRANGER)),
        terms.with_(operator=address(STRANGER)),
        terms.with_(deadline=terms.deadline + 1),
        terms.with_(request_hash=b"\x01" * 32),
        terms.with_(salt=b"\x02" * 32),
    ]
    for changed in altered:
        with expect_revert("InvalidSignature", authorizer=terms.buyer):
            chain.escrow.deposit(chain.sender(SELLER), changed, auth, sig)
    # The original terms still go through: nothing was consumed.
    chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD


def test_buyer_swapped_for_another_funded_buyer_reverts(chain: Chain) -> None:
    terms = make_terms(chain, buyer=BUYER)
    auth, sig = sign_deposit(chain, terms)
    with expect_revert("InvalidSignature", authorizer=address(BUYER2)):
        chain.escrow.deposit(chain.sender(SELLER), terms.with_(buyer=address(BUYER2)), auth, sig)


def test_authorization_used_twice_reverts_already_deposited(chain: Chain) -> None:
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms)
    chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    escrow_id = chain.escrow.id_of(terms)
    with expect_revert("AlreadyDeposited", id=escrow_id, state=State.HELD):
        chain.escrow.deposit(chain.sender(STRANGER), terms, auth, sig)
    assert chain.token.balance_of(chain.escrow.address) == terms.amount


def test_cancelled_authorization_cannot_be_deposited(chain: Chain) -> None:
    """The buyer cancelled the authorization at the token: the token refuses it, nothing is held."""
    terms = make_terms(chain)
    cancel_authorization(chain, terms)
    auth, sig = sign_deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    with expect_revert("AuthorizationUsedOrCanceled", authorizer=terms.buyer, nonce=escrow_id):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert chain.escrow.state_of(escrow_id) is State.NONE
    assert chain.token.balance_of(chain.escrow.address) == 0


def test_deposit_after_settlement_reverts_already_deposited_with_the_settled_state(chain: Chain) -> None:
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms)
    chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    chain.escrow.refund(chain.sender(SELLER), terms)
    with expect_revert("AlreadyDeposited", id=chain.escrow.id_of(terms), state=State.REFUNDED):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_expired_authorization_reverts_at_the_token(chain: Chain) -> None:
    now = chain.now()
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms, valid_before=now + 3)
    chain.mine(now + 10)
    with expect_revert("AuthorizationExpired", validBefore=now + 3):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_not_yet_valid_authorization_reverts_at_the_token(chain: Chain) -> None:
    now = chain.now()
    terms = make_terms(chain)
    auth, sig = sign_deposit(chain, terms, valid_after=now + 1000)
    with expect_revert("AuthorizationNotYetValid", validAfter=now + 1000):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)


def test_buyer_without_funds_cannot_deposit(chain: Chain) -> None:
    terms = make_terms(chain, buyer=STRANGER)
    auth, sig = sign_deposit(chain, terms)
    with expect_revert("InsufficientBalance", account=terms.buyer, balance=0, needed=terms.amount):
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, sig)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.NONE
