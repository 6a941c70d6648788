"""Finding blocks by time and deliveries by id, in chunks a public RPC accepts."""

from __future__ import annotations

import os

from fixtures.chain import SELLER, Chain
from helpers import deposit, make_terms

from escrow_py.chain.blocks import chunks, first_block_at
from escrow_py.protocol.terms import delivery_hash


def test_chunks_cover_the_range_exactly_once() -> None:
    assert list(chunks(5, 14, 4)) == [(5, 8), (9, 12), (13, 14)]
    assert list(chunks(5, 5, 4)) == [(5, 5)]
    assert list(chunks(6, 5, 4)) == []


def test_first_block_at_finds_the_first_block_at_or_after_a_time(chain: Chain) -> None:
    start = chain.now() + 100
    for i in range(7):
        chain.mine(start + 10 * i)  # blocks stamped start, start+10, ..., start+60
    head = int(chain.w3.eth.block_number)
    first = head - 6
    assert first_block_at(chain.w3, start) == first
    assert first_block_at(chain.w3, start + 1) == first + 1  # between blocks: the next one
    assert first_block_at(chain.w3, start + 60) == head
    assert first_block_at(chain.w3, start + 61) == head + 1  # not mined yet
    assert first_block_at(chain.w3, 0) == 0


def test_delivery_of_searches_from_a_time_in_small_chunks(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    signed_at = chain.now()
    for i in range(5):
        chain.mine(signed_at + 10 * (i + 1))
    body_hash = delivery_hash(b"the bytes")
    receipt = chain.escrow.deliver(chain.sender(SELLER), terms, body_hash)
    for _ in range(5):
        chain.mine()
    escrow_id = chain.escrow.id_of(terms)
    found = chain.escrow.delivery_of(escrow_id, since=signed_at, chunk=2)
    assert found is not None and found.delivery_hash == body_hash
    assert found.at.block_number == receipt["blockNumber"]
    # Bounded by time: a window that ends before the delivery does not see it.
    assert chain.escrow.delivery_of(escrow_id, since=signed_at, until=signed_at + 45, chunk=2) is None
    assert chain.escrow.delivery_of(escrow_id, since=found_at(chain, found.at.block_number) + 1, chunk=2) is None
    assert chain.escrow.delivery_of(os.urandom(32), since=signed_at, chunk=2) is None


def found_at(chain: Chain, block: int) -> int:
    return int(chain.w3.eth.get_block(block)["timestamp"])


def test_delivery_in_checks_the_sellers_pointer(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    receipt = chain.escrow.deliver(chain.sender(SELLER), terms, delivery_hash(b"x"))
    tx = bytes(receipt["transactionHash"])
    found = chain.escrow.delivery_in(tx, chain.escrow.id_of(terms))
    assert found is not None and found.delivery_hash == delivery_hash(b"x")
    assert chain.escrow.delivery_in(tx, os.urandom(32)) is None  # a pointer to another escrow's delivery
    assert chain.escrow.delivery_in(os.urandom(32), chain.escrow.id_of(terms)) is None  # no such transaction
