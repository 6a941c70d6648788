"""X402Escrow.stateOf: None, Held, Released, Refunded, read at any block."""

from __future__ import annotations

import os

from fixtures.chain import SELLER, STRANGER, Chain
from helpers import clock_at, deposit, make_terms

from escrow_py.protocol.terms import State, delivery_hash


def test_an_unknown_id_is_none(chain: Chain) -> None:
    assert chain.escrow.state_of(os.urandom(32)) is State.NONE
    assert chain.escrow.state_of(chain.escrow.id_of(make_terms(chain))) is State.NONE


def test_lifecycle_to_released_as_of_each_block(chain: Chain) -> None:
    terms = make_terms(chain)
    escrow_id = chain.escrow.id_of(terms)
    before = chain.w3.eth.block_number
    deposited = deposit(chain, terms)["blockNumber"]
    released = chain.escrow.deliver(chain.sender(SELLER), terms, delivery_hash(b"ok"))["blockNumber"]
    assert chain.escrow.state_of(escrow_id, before) is State.NONE
    assert chain.escrow.state_of(escrow_id, deposited) is State.HELD
    assert chain.escrow.state_of(escrow_id, released) is State.RELEASED
    assert chain.escrow.state_of(escrow_id) is State.RELEASED


def test_lifecycle_to_refunded(chain: Chain) -> None:
    terms = make_terms(chain, window=100)
    escrow_id = chain.escrow.id_of(terms)
    deposit(chain, terms)
    assert chain.escrow.state_of(escrow_id) is State.HELD
    clock_at(chain, terms.deadline)
    chain.escrow.refund(chain.sender(STRANGER), terms)
    assert chain.escrow.state_of(escrow_id) is State.REFUNDED
    assert State.REFUNDED.settled and State.RELEASED.settled
    assert not State.HELD.settled and not State.NONE.settled


def test_escrows_are_independent(chain: Chain) -> None:
    a, b = make_terms(chain), make_terms(chain)
    deposit(chain, a)
    deposit(chain, b)
    chain.escrow.refund(chain.sender(SELLER), a)
    assert chain.escrow.state_of(chain.escrow.id_of(a)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(b)) is State.HELD
