"""X402Escrow.deliverMany: settled entries skipped, counts returned, every seller paid exactly its due."""

from __future__ import annotations

from collections import Counter

from conftest import BUYER, BUYER2, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import address, clock_at, deposit, expect_revert, make_terms

from escrow_py.chain.escrow import Delivered
from escrow_py.terms import State, Terms, delivery_hash


def _raw(chain: Chain, entries: list[tuple[Terms, bytes]]) -> bytes:
    """deliverMany calldata in exactly this order (the binding sorts; these tests must not)."""
    data = chain.escrow.contract.encode_abi(
        "deliverMany", args=[[t.as_tuple() for t, _ in entries], [h for _, h in entries]]
    )
    return bytes.fromhex(data.removeprefix("0x"))


def _released_count(chain: Chain, who: int, data: bytes) -> int:
    return int.from_bytes(chain.sender(who).call(chain.escrow.address, data), "big")


def test_delivers_every_held_entry_and_returns_the_count(chain: Chain) -> None:
    batch = [make_terms(chain, amount=1_000 * (i + 1)) for i in range(3)]
    for terms in batch:
        deposit(chain, terms)
    entries = [(t, delivery_hash(bytes([i]))) for i, t in enumerate(batch)]
    assert _released_count(chain, OPERATOR, chain.escrow.deliver_many_data(entries)) == 3
    seller_before = chain.token.balance_of(address(SELLER))
    receipt = chain.escrow.deliver_many(chain.sender(OPERATOR), entries)
    assert chain.token.balance_of(address(SELLER)) == seller_before + 6_000
    assert chain.token.balance_of(chain.escrow.address) == 0
    delivered = {e.id: e.delivery_hash for e in chain.escrow.events_in(receipt) if isinstance(e, Delivered)}
    assert delivered == {chain.escrow.id_of(t): h for t, h in entries}
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.RELEASED for t in batch)


def test_settled_entries_are_skipped_not_reverted(chain: Chain) -> None:
    released, refunded, held = (make_terms(chain, amount=a) for a in (1_000, 2_000, 4_000))
    for terms in (released, refunded, held):
        deposit(chain, terms)
    chain.escrow.deliver(chain.sender(SELLER), released, delivery_hash(b"r"))
    chain.escrow.refund(chain.sender(SELLER), refunded)
    entries = [(released, delivery_hash(b"1")), (refunded, delivery_hash(b"2")), (held, delivery_hash(b"3"))]
    data = _raw(chain, entries)
    assert _released_count(chain, SELLER, data) == 1
    seller_before = chain.token.balance_of(address(SELLER))
    buyer_before = chain.token.balance_of(address(BUYER))
    receipt = chain.sender(SELLER).transact(chain.escrow.address, data)
    assert chain.token.balance_of(address(SELLER)) == seller_before + 4_000
    assert chain.token.balance_of(address(BUYER)) == buyer_before
    events = chain.escrow.events_in(receipt)
    assert [e.id for e in events] == [chain.escrow.id_of(held)]
    assert chain.escrow.state_of(chain.escrow.id_of(refunded)) is State.REFUNDED
    # A racing second poster: everything settled, nothing paid, no revert.
    assert _released_count(chain, SELLER, data) == 0
    chain.sender(SELLER).transact(chain.escrow.address, data)
    assert chain.token.balance_of(address(SELLER)) == seller_before + 4_000


def test_the_same_entry_twice_in_one_batch_is_paid_once(chain: Chain) -> None:
    terms = make_terms(chain, amount=9_000)
    deposit(chain, terms)
    entries = [(terms, delivery_hash(b"a")), (terms, delivery_hash(b"a"))]
    assert _released_count(chain, SELLER, _raw(chain, entries)) == 1
    seller_before = chain.token.balance_of(address(SELLER))
    chain.sender(SELLER).transact(chain.escrow.address, _raw(chain, entries))
    assert chain.token.balance_of(address(SELLER)) == seller_before + 9_000


def test_interleaved_sellers_and_tokens_each_get_their_due(chain: Chain) -> None:
    usdc2 = chain.deploy_token()
    tokens = [chain.token, usdc2]
    plan = [  # (token, seller, buyer, amount), deliberately unsorted and alternating
        (0, SELLER, BUYER, 1_000),
        (1, SELLER, BUYER, 2_000),
        (0, SELLER2, BUYER2, 3_000),
        (0, SELLER, BUYER2, 5_000),
        (1, SELLER2, BUYER, 7_000),
        (1, SELLER2, BUYER2, 11_000),
        (0, SELLER, BUYER, 13_000),
        (1, SELLER, BUYER2, 17_000),
    ]
    entries = []
    due: Counter[tuple[int, int]] = Counter()
    for token, seller, buyer, amount in plan:
        terms = make_terms(chain, token=tokens[token].address, seller=seller, buyer=buyer, amount=amount)
        deposit(chain, terms)
        entries.append((terms, delivery_hash(amount.to_bytes(4, "big"))))
        due[(token, seller)] += amount
    before = {(t, s): tokens[t].balance_of(address(s)) for t in (0, 1) for s in (SELLER, SELLER2)}
    buyers_before = {(t, b): tokens[t].balance_of(address(b)) for t in (0, 1) for b in (BUYER, BUYER2)}
    data = _raw(chain, entries)
    assert _released_count(chain, OPERATOR, data) == len(plan)
    chain.sender(OPERATOR).transact(chain.escrow.address, data)
    for (t, s), start in before.items():
        assert tokens[t].balance_of(address(s)) == start + due[(t, s)], (t, s)
    for (t, b), start in buyers_before.items():
        assert tokens[t].balance_of(address(b)) == start, (t, b)
    for each in tokens:
        assert each.balance_of(chain.escrow.address) == 0


def test_sorted_binding_pays_the_same(chain: Chain) -> None:
    """The binding's (token, seller) sort changes only the number of transfers, not who gets what."""
    usdc2 = chain.deploy_token()
    batch = [
        make_terms(chain, token=usdc2.address, seller=SELLER2, amount=100),
        make_terms(chain, seller=SELLER, amount=200),
        make_terms(chain, token=usdc2.address, seller=SELLER, amount=400),
        make_terms(chain, seller=SELLER2, amount=800),
    ]
    for terms in batch:
        deposit(chain, terms)
    chain.escrow.deliver_many(chain.sender(OPERATOR), [(t, delivery_hash(b"")) for t in batch])
    assert chain.token.balance_of(address(SELLER)) == 200
    assert chain.token.balance_of(address(SELLER2)) == 800
    assert usdc2.balance_of(address(SELLER)) == 400
    assert usdc2.balance_of(address(SELLER2)) == 100


def test_length_mismatch_reverts(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    data = chain.escrow.contract.encode_abi("deliverMany", args=[[terms.as_tuple(), terms.as_tuple()], [b"\x00" * 32]])
    with expect_revert("LengthMismatch", terms=2, deliveryHashes=1):
        chain.sender(SELLER).transact(chain.escrow.address, bytes.fromhex(data.removeprefix("0x")))


def test_empty_batch_releases_nothing(chain: Chain) -> None:
    assert _released_count(chain, STRANGER, _raw(chain, [])) == 0


def test_an_unknown_entry_reverts_the_whole_batch(chain: Chain) -> None:
    held, unknown = make_terms(chain), make_terms(chain)
    deposit(chain, held)
    with expect_revert("NotHeld", id=chain.escrow.id_of(unknown), state=State.NONE):
        chain.escrow.deliver_many(chain.sender(SELLER), [(held, b"\x00" * 32), (unknown, b"\x00" * 32)])
    assert chain.escrow.state_of(chain.escrow.id_of(held)) is State.HELD


def test_an_entry_past_its_deadline_reverts_the_whole_batch(chain: Chain) -> None:
    early = make_terms(chain, window=50)
    late = make_terms(chain, window=5_000)
    deposit(chain, early)
    deposit(chain, late)
    clock_at(chain, early.deadline)
    with expect_revert("DeadlinePassed", deadline=early.deadline, now_=early.deadline):
        chain.escrow.deliver_many(chain.sender(SELLER), [(late, b"\x00" * 32), (early, b"\x00" * 32)])
    assert chain.escrow.state_of(chain.escrow.id_of(late)) is State.HELD


def test_an_entry_of_another_seller_reverts_the_whole_batch(chain: Chain) -> None:
    mine = make_terms(chain, seller=SELLER, operator=SELLER)
    theirs = make_terms(chain, seller=SELLER2, operator=SELLER2)
    deposit(chain, mine)
    deposit(chain, theirs)
    with expect_revert("NotSellerOrOperator", caller=address(SELLER), seller=address(SELLER2)):
        chain.escrow.deliver_many(chain.sender(SELLER), [(mine, b"\x00" * 32), (theirs, b"\x00" * 32)])
    assert chain.escrow.state_of(chain.escrow.id_of(mine)) is State.HELD
