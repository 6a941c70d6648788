"""X402Escrow.settle: serve-first, pull the buyer's authorization and pay the seller in one transaction.

A settled id takes no storage: the token's spent ERC-3009 nonce is what refuses a second settlement
or a deposit of it, and what refuses settling an id that was deposited.
"""

from __future__ import annotations

import pytest
from fixtures.chain import BUYER, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import (
    address,
    cancel_authorization,
    clock_at,
    deploy_fiat_token,
    deposit,
    expect_revert,
    make_terms,
    mine_at,
    sign_deposit,
)

from escrow_devtools.artifacts import load_artifact
from escrow_py.chain.escrow import Settled, Settlement
from escrow_py.protocol.eip3009 import TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.terms import State, Terms, delivery_hash

HASH = delivery_hash(b"served first")
ZERO = "0x0000000000000000000000000000000000000000"


def signed(chain: Chain, terms: Terms, delivery: bytes = HASH) -> Settlement:
    auth, signature = sign_deposit(chain, terms)
    return Settlement(terms, auth, signature, delivery)


def test_settle_pulls_and_pays_the_seller_at_once_and_commits_the_hash(chain: Chain) -> None:
    terms = make_terms(chain, amount=7_000)
    entry = signed(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    buyer_before = chain.token.balance_of(terms.buyer)
    signed_at = chain.now()
    receipt = chain.escrow.settle(chain.sender(SELLER), entry)
    assert chain.token.balance_of(terms.buyer) == buyer_before - 7_000
    assert chain.token.balance_of(terms.seller) == 7_000
    assert chain.token.balance_of(chain.escrow.address) == 0
    assert chain.escrow.settlements_in(receipt) == [
        Settled(escrow_id, HASH, chain.escrow.settlements_in(receipt)[0].at)
    ]
    assert chain.escrow.events_in(receipt) == []  # no Deposited/Delivered/Refunded: nothing for the keeper
    # Never Held, no storage: the record is the event and the token's spent nonce.
    assert chain.escrow.state_of(escrow_id) is State.NONE
    assert chain.token.authorization_state(terms.buyer, escrow_id)
    # recover() finds the hash by escrow id.
    found = chain.escrow.settlement_of(escrow_id, since=signed_at, until=terms.deadline)
    assert found is not None and found.delivery_hash == HASH and found.at.tx_hash == bytes(receipt["transactionHash"])


def test_the_operator_may_settle_and_nobody_else(chain: Chain) -> None:
    terms = make_terms(chain)
    entry = signed(chain, terms)
    for who in (STRANGER, BUYER, SELLER2):
        with expect_revert("NotSellerOrOperator", caller=address(who), seller=terms.seller, operator=terms.operator):
            chain.escrow.settle(chain.sender(who), entry)
    chain.escrow.settle(chain.sender(OPERATOR), entry)
    assert chain.token.balance_of(terms.seller) == terms.amount


def test_an_unset_hash_a_zero_amount_and_a_zero_seller_are_refused(chain: Chain) -> None:
    terms = make_terms(chain)
    with expect_revert("ZeroDeliveryHash", id=chain.escrow.id_of(terms)):
        chain.escrow.settle(chain.sender(SELLER), signed(chain, terms, bytes(32)))
    with expect_revert("ZeroAmount"):
        chain.escrow.settle(chain.sender(SELLER), signed(chain, terms.with_(amount=0)))
    with expect_revert("ZeroSeller"):
        chain.escrow.settle(chain.sender(OPERATOR), signed(chain, terms.with_(seller=ZERO)))
    assert not chain.token.authorization_state(terms.buyer, chain.escrow.id_of(terms))


def test_settlement_is_strictly_before_the_deadline(chain: Chain) -> None:
    early, late = make_terms(chain, window=100), make_terms(chain, window=100)
    on_time = chain.escrow.settle_data(signed(chain, early))
    _, revert = mine_at(chain, SELLER, on_time, early.deadline - 1)
    assert revert is None and chain.token.balance_of(early.seller) == early.amount
    _, revert = mine_at(chain, SELLER, chain.escrow.settle_data(signed(chain, late)), late.deadline)
    assert revert is not None and revert.name == "DeadlinePassed"
    assert revert.args_by_name == {"deadline": late.deadline, "now_": late.deadline}
    assert not chain.token.authorization_state(late.buyer, chain.escrow.id_of(late))


def test_a_token_address_without_code_is_refused(chain: Chain) -> None:
    terms = make_terms(chain, token=address(STRANGER))
    auth = authorization_for(terms, chain.escrow.address, chain.escrow.chain_id, 0, terms.deadline)
    domain = TokenDomain(name="USDC", version="2", chain_id=chain.escrow.chain_id, verifying_contract=terms.token)
    signature = sign_authorization(chain.signer(BUYER), domain, auth)
    with expect_revert("NotAContract", token=address(STRANGER)):
        chain.escrow.settle(chain.sender(SELLER), Settlement(terms, auth, signature, HASH))


def test_a_settled_id_is_never_deposited_refunded_delivered_or_settled_again(chain: Chain) -> None:
    terms = make_terms(chain)
    entry = signed(chain, terms)
    chain.escrow.settle(chain.sender(SELLER), entry)
    escrow_id = chain.escrow.id_of(terms)
    seller_paid = chain.token.balance_of(terms.seller)
    with expect_revert("AuthorizationUsedOrCanceled", authorizer=terms.buyer, nonce=escrow_id):
        chain.escrow.settle(chain.sender(SELLER), entry)
    with expect_revert("AuthorizationUsedOrCanceled", authorizer=terms.buyer, nonce=escrow_id):
        chain.escrow.deposit(chain.sender(SELLER), terms, entry.authorization, entry.signature)
    with expect_revert("NotHeld", id=escrow_id, state=State.NONE):
        chain.escrow.refund(chain.sender(SELLER), terms)
    with expect_revert("NotHeld", id=escrow_id, state=State.NONE):
        chain.escrow.deliver(chain.sender(SELLER), terms, HASH)
    clock_at(chain, terms.deadline)
    assert chain.escrow.refund_many(chain.sender(STRANGER), [terms])["status"] == 1  # skipped, nothing paid
    assert chain.token.balance_of(terms.seller) == seller_paid
    assert chain.token.balance_of(chain.escrow.address) == 0


@pytest.mark.parametrize("then", ["held", "delivered", "refunded"])
def test_a_deposited_id_can_never_be_settled(chain: Chain, then: str) -> None:
    """The deposit spent the authorization's nonce: the token refuses the same pull again."""
    terms = make_terms(chain)
    deposit(chain, terms)
    if then == "delivered":
        chain.escrow.deliver(chain.sender(SELLER), terms, HASH)
    elif then == "refunded":
        chain.escrow.refund(chain.sender(SELLER), terms)
    balances = (chain.token.balance_of(terms.buyer), chain.token.balance_of(terms.seller))
    with expect_revert("AuthorizationUsedOrCanceled", authorizer=terms.buyer, nonce=chain.escrow.id_of(terms)):
        chain.escrow.settle(chain.sender(SELLER), signed(chain, terms))
    assert (chain.token.balance_of(terms.buyer), chain.token.balance_of(terms.seller)) == balances


def test_a_buyer_that_cancelled_or_moved_its_funds_is_not_settled(chain: Chain) -> None:
    cancelled, broke = make_terms(chain), make_terms(chain, buyer=BUYER)
    cancelled_entry, broke_entry = signed(chain, cancelled), signed(chain, broke)
    cancel_authorization(chain, cancelled)
    with expect_revert("AuthorizationUsedOrCanceled", authorizer=cancelled.buyer):
        chain.escrow.settle(chain.sender(SELLER), cancelled_entry)
    chain.token.transfer(chain.sender(BUYER), address(STRANGER), chain.token.balance_of(address(BUYER)))
    with expect_revert("InsufficientBalance", account=address(BUYER)):
        chain.escrow.settle(chain.sender(SELLER), broke_entry)
    assert chain.token.balance_of(address(SELLER)) == 0


def test_a_refused_payout_to_the_seller_undoes_the_pull(chain: Chain) -> None:
    token = chain.deploy_token("BlockingToken")
    blocking = chain.w3.eth.contract(abi=load_artifact("BlockingToken")["abi"])
    block = blocking.encode_abi("setBlocked", args=[address(SELLER)])
    chain.deployer.transact(token.address, bytes.fromhex(block.removeprefix("0x")))
    terms = make_terms(chain, token=token.address, amount=3_000)
    buyer_before = token.balance_of(terms.buyer)
    with expect_revert("TransferFailed", token=token.address, to=address(SELLER), amount=3_000):
        chain.escrow.settle(chain.sender(SELLER), signed(chain, terms))
    assert token.balance_of(terms.buyer) == buyer_before
    assert not token.authorization_state(terms.buyer, chain.escrow.id_of(terms))  # the buyer's signature still unused


def test_settle_on_circles_usdc(chain: Chain) -> None:
    usdc = deploy_fiat_token(chain)
    terms = make_terms(chain, token=usdc.address, amount=12_345)
    receipt = chain.escrow.settle(chain.sender(OPERATOR), signed(chain, terms))
    assert usdc.balance_of(terms.seller) == 12_345
    assert [e.id for e in chain.escrow.settlements_in(receipt)] == [chain.escrow.id_of(terms)]
    with expect_revert("Error", message="FiatTokenV2: authorization is used or canceled"):
        chain.escrow.settle(chain.sender(OPERATOR), signed(chain, terms))
