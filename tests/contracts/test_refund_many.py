"""X402Escrow.refundMany: settled entries skipped, counts returned, every buyer refunded exactly its due."""

from __future__ import annotations

from collections import Counter

from fixtures.chain import BUYER, BUYER2, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import address, clock_at, deposit, make_terms

from escrow_py.chain.escrow import Refunded
from escrow_py.protocol.terms import State, Terms, delivery_hash


def _raw(chain: Chain, batch: list[Terms]) -> bytes:
    """refundMany calldata in exactly this order (the binding sorts; these tests must not)."""
    data = chain.escrow.contract.encode_abi("refundMany", args=[[t.as_tuple() for t in batch]])
    return bytes.fromhex(data.removeprefix("0x"))


def _refunded_count(chain: Chain, who: int, data: bytes) -> int:
    return int.from_bytes(chain.sender(who).call(chain.escrow.address, data), "big")


def test_anyone_refunds_expired_entries_and_gets_the_count(chain: Chain) -> None:
    batch = [make_terms(chain, amount=1_000 * (i + 1), window=100) for i in range(3)]
    for terms in batch:
        deposit(chain, terms)
    clock_at(chain, max(t.deadline for t in batch))
    assert _refunded_count(chain, STRANGER, chain.escrow.refund_many_data(batch)) == 3
    buyer_before = chain.token.balance_of(address(BUYER))
    receipt = chain.escrow.refund_many(chain.sender(STRANGER), batch)
    assert chain.token.balance_of(address(BUYER)) == buyer_before + 6_000
    assert chain.token.balance_of(address(STRANGER)) == 0
    assert chain.token.balance_of(chain.escrow.address) == 0
    events = chain.escrow.events_in(receipt)
    assert {e.id for e in events} == {chain.escrow.id_of(t) for t in batch}
    assert all(isinstance(e, Refunded) and e.caller == address(STRANGER) for e in events)


def test_operator_refunds_many_before_the_deadline(chain: Chain) -> None:
    batch = [make_terms(chain) for _ in range(2)]
    for terms in batch:
        deposit(chain, terms)
    chain.escrow.refund_many(chain.sender(OPERATOR), batch)
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch)


def test_settled_entries_are_skipped_not_reverted(chain: Chain) -> None:
    released, refunded, held = (make_terms(chain, amount=a, window=100) for a in (1_000, 2_000, 4_000))
    for terms in (released, refunded, held):
        deposit(chain, terms)
    chain.escrow.deliver(chain.sender(SELLER), released, delivery_hash(b"r"))
    chain.escrow.refund(chain.sender(SELLER), refunded)
    clock_at(chain, held.deadline)
    data = _raw(chain, [released, refunded, held])
    assert _refunded_count(chain, STRANGER, data) == 1
    buyer_before = chain.token.balance_of(address(BUYER))
    seller_before = chain.token.balance_of(address(SELLER))
    receipt = chain.sender(STRANGER).transact(chain.escrow.address, data)
    assert chain.token.balance_of(address(BUYER)) == buyer_before + 4_000
    assert chain.token.balance_of(address(SELLER)) == seller_before
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(held)]
    assert chain.escrow.state_of(chain.escrow.id_of(released)) is State.RELEASED
    # Two keepers racing: the second one pays gas and nothing else.
    assert _refunded_count(chain, OPERATOR, data) == 0
    chain.sender(OPERATOR).transact(chain.escrow.address, data)
    assert chain.token.balance_of(address(BUYER)) == buyer_before + 4_000


def test_the_same_entry_twice_in_one_batch_is_refunded_once(chain: Chain) -> None:
    terms = make_terms(chain, amount=9_000)
    deposit(chain, terms)
    data = _raw(chain, [terms, terms])
    assert _refunded_count(chain, SELLER, data) == 1
    buyer_before = chain.token.balance_of(address(BUYER))
    chain.sender(SELLER).transact(chain.escrow.address, data)
    assert chain.token.balance_of(address(BUYER)) == buyer_before + 9_000


def test_interleaved_buyers_and_tokens_each_get_their_due(chain: Chain) -> None:
    usdc2 = chain.deploy_token()
    tokens = [chain.token, usdc2]
    plan = [  # (token, buyer, seller, amount), deliberately unsorted and alternating
        (1, BUYER, SELLER, 1_000),
        (0, BUYER2, SELLER, 2_000),
        (1, BUYER2, SELLER2, 3_000),
        (0, BUYER, SELLER2, 5_000),
        (0, BUYER2, SELLER, 7_000),
        (1, BUYER, SELLER, 11_000),
        (0, BUYER, SELLER2, 13_000),
    ]
    batch = []
    due: Counter[tuple[int, int]] = Counter()
    for token, buyer, seller, amount in plan:
        terms = make_terms(chain, token=tokens[token].address, buyer=buyer, seller=seller, amount=amount, window=100)
        deposit(chain, terms)
        batch.append(terms)
        due[(token, buyer)] += amount
    before = {(t, b): tokens[t].balance_of(address(b)) for t in (0, 1) for b in (BUYER, BUYER2)}
    clock_at(chain, max(t.deadline for t in batch))
    data = _raw(chain, batch)
    assert _refunded_count(chain, STRANGER, data) == len(plan)
    chain.sender(STRANGER).transact(chain.escrow.address, data)
    for (t, b), start in before.items():
        assert tokens[t].balance_of(address(b)) == start + due[(t, b)], (t, b)
    for each in tokens:
        assert each.balance_of(chain.escrow.address) == 0
        assert each.balance_of(address(SELLER)) == 0
        assert each.balance_of(address(SELLER2)) == 0


def test_an_unexpired_entry_is_skipped_in_a_strangers_batch(chain: Chain) -> None:
    expired = make_terms(chain, window=50)
    running = make_terms(chain, window=5_000)
    deposit(chain, expired)
    deposit(chain, running)
    clock_at(chain, expired.deadline)
    data = _raw(chain, [expired, running])
    assert _refunded_count(chain, STRANGER, data) == 1
    receipt = chain.sender(STRANGER).transact(chain.escrow.address, data)
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(expired)]
    assert chain.escrow.state_of(chain.escrow.id_of(expired)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(running)) is State.HELD
    # The seller's side may refund it early in a batch too.
    assert _refunded_count(chain, OPERATOR, data) == 1


def test_an_unknown_entry_is_skipped(chain: Chain) -> None:
    held, unknown = make_terms(chain), make_terms(chain)
    deposit(chain, held)
    data = _raw(chain, [held, unknown])
    assert _refunded_count(chain, SELLER, data) == 1
    chain.sender(SELLER).transact(chain.escrow.address, data)
    assert chain.escrow.state_of(chain.escrow.id_of(held)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(unknown)) is State.NONE


def test_a_payout_that_passes_simulation_but_fails_mined_does_not_sink_the_batch(chain: Chain) -> None:
    """The keeper's trap: a token that pays in eth_call (gas price 0) and reverts once mined.

    Its escrow goes back to Held and is named by PayoutFailed; the honest escrows beside it are refunded.
    """
    trap = chain.deploy_token("SimulationOnlyToken")
    honest = [make_terms(chain, buyer=BUYER, amount=1_000, window=50), make_terms(chain, buyer=BUYER2, window=50)]
    trapped = make_terms(chain, token=trap.address, buyer=BUYER, amount=7_000, window=50)
    for terms in (*honest, trapped):
        deposit(chain, terms)
    clock_at(chain, trapped.deadline)
    data = _raw(chain, [honest[0], trapped, honest[1]])
    assert _refunded_count(chain, STRANGER, data) == 3  # what the keeper's simulation sees
    buyers_before = {b: chain.token.balance_of(address(b)) for b in (BUYER, BUYER2)}
    receipt = chain.sender(STRANGER).transact(chain.escrow.address, data)
    assert {e.id for e in chain.escrow.events_in(receipt)} == {chain.escrow.id_of(t) for t in honest}
    failures = chain.escrow.payout_failures_in(receipt)
    assert [(f.token, f.to, f.amount) for f in failures] == [(trap.address, address(BUYER), 7_000)]
    assert chain.escrow.state_of(chain.escrow.id_of(trapped)) is State.HELD
    assert trap.balance_of(chain.escrow.address) == 7_000
    assert chain.token.balance_of(address(BUYER)) == buyers_before[BUYER] + 1_000
    assert chain.token.balance_of(address(BUYER2)) == buyers_before[BUYER2] + honest[1].amount
    assert chain.token.balance_of(chain.escrow.address) == 0


def test_empty_batch_refunds_nothing(chain: Chain) -> None:
    assert _refunded_count(chain, STRANGER, _raw(chain, [])) == 0


def test_a_payout_reverting_with_a_return_data_bomb_costs_its_capped_call_and_nothing_more(chain: Chain) -> None:
    """100,000 bytes of revert data from a token: the escrow copies none of it into its own memory.

    The same batch is measured twice, once with an honest third entry and once with the bomb in its
    place: the bomb may cost up to the payout's gas allowance, never the copy of its data on top.
    """
    bomb = chain.deploy_token("ReturnBombToken")

    def batch_gas(fourth_token: str | None) -> tuple[int, list[Terms]]:
        honest = [make_terms(chain, buyer=b, amount=1_000, window=50) for b in (BUYER, BUYER2)]
        # Not next to BUYER's honest entry, so neither run shares a transfer with it.
        fourth = make_terms(chain, buyer=BUYER, amount=2_000, window=50, token=fourth_token)
        for terms in (*honest, fourth):
            deposit(chain, terms)
        clock_at(chain, fourth.deadline)
        receipt = chain.sender(OPERATOR).transact(chain.escrow.address, _raw(chain, [*honest, fourth]))
        assert {e.id for e in chain.escrow.events_in(receipt)} >= {chain.escrow.id_of(t) for t in honest}
        return int(receipt["gasUsed"]), [*honest, fourth]

    plain_gas, _ = batch_gas(None)
    bomb_gas, batch = batch_gas(bomb.address)
    bombed = batch[-1]
    assert chain.escrow.state_of(chain.escrow.id_of(bombed)) is State.HELD  # restored, named by PayoutFailed
    assert bomb.balance_of(chain.escrow.address) == bombed.amount
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch[:-1])
    # The token's own frame pays ~28.4k for expanding its memory to 100,000 bytes (measured: the bomb costs
    # ~26k more than an honest transfer). Copying the data back would add ~28.4k of the escrow's memory
    # expansion and ~9.4k of copying on top (~64k): the bound sits between the two.
    assert bomb_gas - plain_gas < 45_000, (bomb_gas, plain_gas)
