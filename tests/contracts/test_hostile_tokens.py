"""Tokens that re-enter, return false or block a party: the escrow stays consistent and other tokens unaffected."""

from __future__ import annotations

from typing import Any

from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from fixtures.chain import BUYER, OPERATOR, SELLER, STRANGER, Chain
from helpers import address, clock_at, deposit, expect_revert, make_terms
from web3.contract import Contract
from web3.types import RPCEndpoint

from escrow_devtools.artifacts import load_artifact
from escrow_py.chain.token import Token
from escrow_py.chain.tx import decode_revert
from escrow_py.protocol.terms import State, delivery_hash

HASH = delivery_hash(b"served")


# The token's own revert data that TransferFailed carries as `reason`.
REENTRANCY = keccak(text="Reentrancy()")[:4]


def blocked(who: str) -> bytes:
    return keccak(text="RecipientBlocked(address)")[:4] + encode(["address"], [who])


def _as(chain: Chain, token: Token, contract: str) -> Contract:
    return chain.w3.eth.contract(address=token.address, abi=load_artifact(contract)["abi"])


def _arm(chain: Chain, token: Token, data: bytes, *, bubble: bool) -> None:
    """Make the ReentrantToken call the escrow with `data` on every transfer."""
    hook = _as(chain, token, "ReentrantToken").encode_abi("setHook", args=[chain.escrow.address, data, bubble])
    chain.deployer.transact(token.address, bytes.fromhex(hook.removeprefix("0x")))


def _callback_errors(chain: Chain, who: int, data: bytes) -> list[str]:
    """Errors of every call the token made back into the escrow while simulating `data` (callTracer)."""
    trace = chain.w3.provider.make_request(
        RPCEndpoint("debug_traceCall"),
        [
            {"from": address(who), "to": chain.escrow.address, "data": "0x" + data.hex()},
            "latest",
            {"tracer": "callTracer"},
        ],
    )["result"]
    found: list[str] = []

    def walk(frame: dict[str, Any], depth: int) -> None:
        if depth > 0 and to_checksum_address(frame["to"]) == chain.escrow.address and "error" in frame:
            found.append(decode_revert(bytes.fromhex(frame.get("output", "0x")[2:])).name)
        for child in frame.get("calls", []):
            walk(child, depth + 1)

    walk(trace, 0)
    return found


def test_reentrant_refund_during_delivery_bubbles_reentrancy(chain: Chain) -> None:
    token = chain.deploy_token("ReentrantToken")
    a = make_terms(chain, token=token.address, amount=1_000)
    b = make_terms(chain, token=token.address, amount=2_000)
    deposit(chain, a)
    deposit(chain, b)
    _arm(chain, token, chain.escrow.refund_data(b), bubble=True)
    # The guard stops the callback; the escrow reports the failed payout with the token's cause.
    assert _callback_errors(chain, SELLER, chain.escrow.deliver_data(a, HASH)) == ["Reentrancy"]
    with expect_revert("TransferFailed", token=token.address, to=a.seller, amount=1_000, reason=REENTRANCY):
        chain.escrow.deliver(chain.sender(SELLER), a, HASH)
    assert chain.escrow.state_of(chain.escrow.id_of(a)) is State.HELD
    assert chain.escrow.state_of(chain.escrow.id_of(b)) is State.HELD
    assert token.balance_of(chain.escrow.address) == 3_000


def test_reentrant_deliver_during_refund_bubbles_reentrancy(chain: Chain) -> None:
    token = chain.deploy_token("ReentrantToken")
    a = make_terms(chain, token=token.address)
    b = make_terms(chain, token=token.address)
    deposit(chain, a)
    deposit(chain, b)
    _arm(chain, token, chain.escrow.deliver_data(b, HASH), bubble=True)
    assert _callback_errors(chain, OPERATOR, chain.escrow.refund_data(a)) == ["Reentrancy"]
    assert _callback_errors(chain, OPERATOR, chain.escrow.refund_many_data([a])) == ["Reentrancy"]
    with expect_revert("TransferFailed", token=token.address, to=a.buyer, amount=a.amount, reason=REENTRANCY):
        chain.escrow.refund(chain.sender(OPERATOR), a)
    # In a batch the refused payout is put back, not reverted.
    receipt = chain.escrow.refund_many(chain.sender(OPERATOR), [a])
    assert chain.escrow.events_in(receipt) == []
    assert [(f.to, f.amount) for f in chain.escrow.payout_failures_in(receipt)] == [(a.buyer, a.amount)]
    assert chain.escrow.state_of(chain.escrow.id_of(a)) is State.HELD
    assert chain.escrow.state_of(chain.escrow.id_of(b)) is State.HELD


def test_reentrant_call_during_deposit_bubbles_reentrancy(chain: Chain) -> None:
    token = chain.deploy_token("ReentrantToken")
    held = make_terms(chain, token=token.address)
    deposit(chain, held)
    _arm(chain, token, chain.escrow.refund_data(held), bubble=True)
    fresh = make_terms(chain, token=token.address)
    # The token's receiveWithAuthorization is a high-level call: its revert comes out verbatim.
    with expect_revert("Reentrancy"):
        deposit(chain, fresh)
    assert chain.escrow.state_of(chain.escrow.id_of(fresh)) is State.NONE
    assert not token.authorization_state(fresh.buyer, chain.escrow.id_of(fresh))


def test_swallowed_reentrant_callback_fails_and_state_stays_consistent(chain: Chain) -> None:
    token = chain.deploy_token("ReentrantToken")
    reentrant = _as(chain, token, "ReentrantToken")
    a = make_terms(chain, token=token.address, amount=1_000)
    b = make_terms(chain, token=token.address, amount=2_000)
    deposit(chain, a)
    deposit(chain, b)
    _arm(chain, token, chain.escrow.refund_data(b), bubble=False)
    assert _callback_errors(chain, SELLER, chain.escrow.deliver_data(a, HASH)) == ["Reentrancy"]
    seller_before = token.balance_of(a.seller)
    buyer_before = token.balance_of(b.buyer)
    chain.escrow.deliver(chain.sender(SELLER), a, HASH)
    assert reentrant.functions.lastCallbackSucceeded().call() is False
    assert chain.escrow.state_of(chain.escrow.id_of(a)) is State.RELEASED
    assert chain.escrow.state_of(chain.escrow.id_of(b)) is State.HELD
    assert token.balance_of(a.seller) == seller_before + 1_000
    assert token.balance_of(b.buyer) == buyer_before
    assert token.balance_of(chain.escrow.address) == 2_000
    # Once the outer call is over, the same refund goes through normally.
    chain.escrow.refund(chain.sender(OPERATOR), b)
    assert chain.escrow.state_of(chain.escrow.id_of(b)) is State.REFUNDED
    assert token.balance_of(chain.escrow.address) == 0


def test_false_returning_token_payouts_revert_and_funds_stay_held(chain: Chain) -> None:
    token = chain.deploy_token("FalseReturningToken")
    terms = make_terms(chain, token=token.address, amount=4_000, window=100)
    deposit(chain, terms)
    assert token.balance_of(chain.escrow.address) == 4_000
    with expect_revert("TransferFailed", token=token.address, to=terms.seller, amount=4_000, reason=b""):
        chain.escrow.deliver(chain.sender(SELLER), terms, HASH)
    with expect_revert("TransferFailed", token=token.address, to=terms.buyer, amount=4_000, reason=b""):
        chain.escrow.refund(chain.sender(SELLER), terms)
    clock_at(chain, terms.deadline)
    receipt = chain.escrow.refund_many(chain.sender(STRANGER), [terms])
    assert [(f.to, f.amount) for f in chain.escrow.payout_failures_in(receipt)] == [(terms.buyer, 4_000)]
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    assert token.balance_of(chain.escrow.address) == 4_000


def test_blocked_buyer_cannot_be_refunded_but_the_seller_can_be_paid(chain: Chain) -> None:
    token = chain.deploy_token("BlockingToken")
    blocking = _as(chain, token, "BlockingToken")
    refundable = make_terms(chain, token=token.address, amount=1_000, window=100)
    deliverable = make_terms(chain, token=token.address, amount=2_000, window=100)
    deposit(chain, refundable)
    deposit(chain, deliverable)
    block = blocking.encode_abi("setBlocked", args=[address(BUYER)])
    chain.deployer.transact(token.address, bytes.fromhex(block.removeprefix("0x")))
    with expect_revert(
        "TransferFailed", token=token.address, to=address(BUYER), amount=1_000, reason=blocked(address(BUYER))
    ):
        chain.escrow.refund(chain.sender(SELLER), refundable)
    assert chain.escrow.state_of(chain.escrow.id_of(refundable)) is State.HELD  # the documented limit
    chain.escrow.deliver(chain.sender(SELLER), deliverable, HASH)
    assert token.balance_of(address(SELLER)) == 2_000
    assert token.balance_of(chain.escrow.address) == 1_000


def test_a_blocking_token_does_not_hold_up_another_tokens_escrows(chain: Chain) -> None:
    token = chain.deploy_token("BlockingToken")
    blocking = _as(chain, token, "BlockingToken")
    stuck = make_terms(chain, token=token.address, amount=1_000, window=100)
    normal = make_terms(chain, amount=3_000, window=100)
    deposit(chain, stuck)
    deposit(chain, normal)
    block = blocking.encode_abi("setBlocked", args=[address(SELLER)])
    chain.deployer.transact(token.address, bytes.fromhex(block.removeprefix("0x")))
    with expect_revert(
        "TransferFailed", token=token.address, to=address(SELLER), amount=1_000, reason=blocked(address(SELLER))
    ):
        chain.escrow.deliver(chain.sender(SELLER), stuck, HASH)
    # In one batch the blocked payout is put back and the other token's escrow is delivered.
    receipt = chain.escrow.deliver_many(chain.sender(SELLER), [(stuck, HASH), (normal, HASH)])
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(normal)]
    assert chain.escrow.state_of(chain.escrow.id_of(stuck)) is State.HELD
    assert chain.token.balance_of(address(SELLER)) == 3_000
    assert chain.token.balance_of(chain.escrow.address) == 0
    # The seller's own side gives the blocked payment back instead.
    chain.escrow.refund(chain.sender(OPERATOR), stuck)
    assert token.balance_of(chain.escrow.address) == 0


def test_a_token_whose_transfer_returns_nothing_pays_out(chain: Chain) -> None:
    """USDT-style: `transfer` returns no data at all; a successful call with no answer is a transfer."""
    token = chain.deploy_token("NoReturnToken")
    delivered = make_terms(chain, token=token.address, amount=1_000)
    refunded = make_terms(chain, token=token.address, amount=2_000)
    batched = make_terms(chain, token=token.address, amount=4_000)
    for terms in (delivered, refunded, batched):
        deposit(chain, terms)
    chain.escrow.deliver(chain.sender(SELLER), delivered, HASH)
    chain.escrow.refund(chain.sender(SELLER), refunded)
    receipt = chain.escrow.deliver_many(chain.sender(SELLER), [(batched, HASH)])
    assert chain.escrow.payout_failures_in(receipt) == []
    assert token.balance_of(address(SELLER)) == 5_000
    assert token.balance_of(chain.escrow.address) == 0
    assert chain.escrow.state_of(chain.escrow.id_of(batched)) is State.RELEASED


def test_a_token_whose_transfer_returns_fewer_than_32_bytes_is_refused(chain: Chain) -> None:
    """A short answer is no `true`, even right after an honest token's payout in the same batch has left
    a 32-byte `true` (0x...01) in the memory the answer is copied into: 31 bytes overwrite all but that 1."""
    token = chain.deploy_token("ShortReturnToken")
    honest = make_terms(chain, amount=1_000)
    short = make_terms(chain, token=token.address, amount=3_000)
    deposit(chain, honest)
    deposit(chain, short)
    with expect_revert("TransferFailed", token=token.address, to=short.seller, amount=3_000, reason=b""):
        chain.escrow.deliver(chain.sender(SELLER), short, HASH)
    with expect_revert("TransferFailed", token=token.address, to=short.buyer, amount=3_000, reason=b""):
        chain.escrow.refund(chain.sender(SELLER), short)
    # Raw order: the honest payout first, then the short one.
    data = chain.escrow.contract.encode_abi("deliverMany", args=[[honest.as_tuple(), short.as_tuple()], [HASH, HASH]])
    receipt = chain.sender(SELLER).transact(chain.escrow.address, bytes.fromhex(data.removeprefix("0x")))
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(honest)]
    assert [(f.token, f.to, f.amount) for f in chain.escrow.payout_failures_in(receipt)] == [
        (token.address, short.seller, 3_000)
    ]
    assert chain.escrow.state_of(chain.escrow.id_of(short)) is State.HELD
    assert token.balance_of(chain.escrow.address) == 3_000
