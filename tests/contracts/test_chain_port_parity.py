"""One scenario, two EscrowChains: the unit tier's fake and Web3EscrowChain on anvil must tell it the same way.

The fake (tests/fakes/chain.py) stands in for the contract and the token in the unit tier; this
runs the same deposits, deliveries, refunds and refusals through both ports and compares what a
role sees: states, balances, events, and the names of the rules a refused call broke. A change
to the contract that the fake does not follow fails here.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fakes.chain import FakeEscrowChain
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address, dev

from escrow_py.chain.escrow import Deposited, Refunded
from escrow_py.chain.port import EscrowChain
from escrow_py.protocol.eip3009 import authorization_for, sign_authorization
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import EscrowPayload

AMOUNT = 1_000


def _payment(chain: EscrowChain, token: str, *, deadline: int, amount: int = AMOUNT) -> EscrowPayload:
    terms = Terms(
        buyer=address(BUYER),
        seller=address(SELLER),
        operator=address(OPERATOR),
        token=token,
        amount=amount,
        deadline=deadline,
        request_hash=os.urandom(32),
        salt=os.urandom(32),
    )
    auth = authorization_for(terms, chain.escrow, chain.chain_id, 0, deadline)
    return EscrowPayload(
        authorization=auth, signature=sign_authorization(dev(BUYER), chain.token_domain(token), auth), terms=terms
    )


def _refused(call: Any) -> str:
    try:
        call()
    except ContractRevert as exc:
        return exc.name
    return "accepted"


def _story(chain: EscrowChain, token: str) -> list[Any]:
    """What a role sees through the port, step by step."""
    seen: list[Any] = []
    buyer, seller, escrow = address(BUYER), address(SELLER), chain.escrow
    start = chain.next_block_time()
    seen.append(chain.block_time("latest") <= start)

    paid = _payment(chain, token, deadline=start + 300)
    escrow_id = paid.terms.escrow_id(chain.chain_id, escrow)
    balance = chain.balance_of(token, buyer)
    seen += [chain.state_of(escrow_id).name, chain.authorization_used(token, buyer, escrow_id)]
    seen.append(chain.simulate_deposit(paid) > 0)
    # Terms altered after signing: the token refuses the signature over them.
    altered = EscrowPayload(
        authorization=paid.authorization,
        signature=paid.signature,
        terms=paid.terms.model_copy(update={"amount": AMOUNT + 1}),
    )
    seen.append(_refused(lambda: chain.simulate_deposit(altered)))

    receipt = chain.deposit(paid)
    seen.append([type(e).__name__ for e in chain.events_in(receipt)])
    deposited = chain.events_in(receipt)[0]
    seen.append(isinstance(deposited, Deposited) and deposited.id == escrow_id and deposited.terms == paid.terms)
    seen += [chain.state_of(escrow_id).name, chain.authorization_used(token, buyer, escrow_id)]
    seen += [balance - chain.balance_of(token, buyer), chain.balance_of(token, escrow)]
    seen.append(chain.block_time(int(receipt["blockNumber"])) >= start)
    seen.append(_refused(lambda: chain.simulate_deposit(paid)))  # once per id

    served = os.urandom(32)
    receipt = chain.deliver_many([(paid.terms, served)])
    delivered = chain.events_in(receipt)
    seen.append([(type(e).__name__, getattr(e, "delivery_hash", None) == served) for e in delivered])
    seen += [chain.state_of(escrow_id).name, chain.balance_of(token, seller), chain.delivered_hash(escrow_id) == served]
    seen.append(_refused(lambda: chain.refund(paid.terms)))  # settled: nothing to refund
    # Delivering it again is skipped, not refused: a racing poster costs gas, never fails.
    seen.append([type(e).__name__ for e in chain.events_in(chain.deliver_many([(paid.terms, served)]))])

    given_up = _payment(chain, token, deadline=chain.next_block_time() + 300)
    chain.deposit(given_up)
    receipt = chain.refund(given_up.terms)  # the operator may refund early (the handler failed)
    refunded = chain.events_in(receipt)
    seen.append([type(e).__name__ for e in refunded])
    seen.append(isinstance(refunded[0], Refunded) and refunded[0].caller == chain.sender_address)
    seen += [chain.state_of(given_up.terms.escrow_id(chain.chain_id, escrow)).name, chain.balance_of(token, escrow)]

    late = _payment(chain, token, deadline=chain.next_block_time() - 1)
    seen.append(_refused(lambda: chain.simulate_deposit(late)))
    far = _payment(chain, token, deadline=chain.next_block_time() + 31 * 24 * 3600)
    seen.append(_refused(lambda: chain.simulate_deposit(far)))
    broke = _payment(chain, token, deadline=chain.next_block_time() + 300, amount=chain.balance_of(token, buyer) + 1)
    seen.append(_refused(lambda: chain.simulate_deposit(broke)))
    return seen


EXPECTED = [
    True,
    "NONE",
    False,
    True,
    "InvalidSignature",
    ["Deposited"],
    True,
    "HELD",
    True,
    AMOUNT,
    AMOUNT,
    True,
    "AlreadyDeposited",
    [("Delivered", True)],
    "RELEASED",
    AMOUNT,
    True,
    "NotHeld",
    [],
    ["Refunded"],
    True,
    "REFUNDED",
    0,
    "DeadlinePassed",
    "DeadlineTooFar",
    "InsufficientBalance",
]


@pytest.mark.parametrize("kind", ["fake", "anvil"])
def test_the_fake_chain_and_the_contract_on_anvil_tell_the_same_story(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "fake":
        fake: FakeEscrowChain = request.getfixturevalue("fake_chain")
        chain: EscrowChain = fake
        token: str = fake.token
    else:
        real: Chain = request.getfixturevalue("chain")
        chain, token = real.port(OPERATOR), real.token.address
    assert _story(chain, token) == EXPECTED
