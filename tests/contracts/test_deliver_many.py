"""X402Escrow.deliverMany: settled entries skipped, counts returned, every seller paid exactly its due."""

from __future__ import annotations

from collections import Counter

from fixtures.chain import BUYER, BUYER2, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import address, deposit, expect_revert, make_terms, mine_at

from escrow_devtools.artifacts import load_artifact
from escrow_py.chain.escrow import Delivered
from escrow_py.protocol.terms import State, Terms, delivery_hash

HASH = delivery_hash(b"served")
ZERO = "0x0000000000000000000000000000000000000000"


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


def test_a_zero_hash_reverts_the_batch_whatever_the_entrys_state(chain: Chain) -> None:
    held, unknown = make_terms(chain), make_terms(chain)
    deposit(chain, held)
    with expect_revert("ZeroDeliveryHash", id=chain.escrow.id_of(unknown)):
        chain.escrow.deliver_many(chain.sender(SELLER), [(held, HASH), (unknown, bytes(32))])
    assert chain.escrow.state_of(chain.escrow.id_of(held)) is State.HELD


def test_an_unknown_entry_is_skipped(chain: Chain) -> None:
    """A deposit the poster saw and a reorg removed: the rest of the batch is delivered."""
    held, unknown = make_terms(chain), make_terms(chain)
    deposit(chain, held)
    data = _raw(chain, [(held, HASH), (unknown, HASH)])
    assert _released_count(chain, SELLER, data) == 1
    receipt = chain.sender(SELLER).transact(chain.escrow.address, data)
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(held)]
    assert chain.escrow.state_of(chain.escrow.id_of(held)) is State.RELEASED
    assert chain.escrow.state_of(chain.escrow.id_of(unknown)) is State.NONE


def test_an_entry_that_crosses_its_deadline_after_the_simulation_is_skipped(chain: Chain) -> None:
    """Simulated while both are open, mined at the first one's deadline: that one stays Held for its refund."""
    early = make_terms(chain, window=50)
    late = make_terms(chain, window=5_000)
    deposit(chain, early)
    deposit(chain, late)
    data = _raw(chain, [(late, HASH), (early, HASH)])
    assert _released_count(chain, SELLER, data) == 2  # the poster's simulation
    receipt, revert = mine_at(chain, SELLER, data, early.deadline)  # included at the deadline
    assert revert is None
    assert [e.id for e in chain.escrow.events_in(receipt)] == [chain.escrow.id_of(late)]
    assert chain.escrow.state_of(chain.escrow.id_of(late)) is State.RELEASED
    assert chain.escrow.state_of(chain.escrow.id_of(early)) is State.HELD
    assert chain.token.balance_of(address(SELLER)) == late.amount
    assert chain.token.balance_of(chain.escrow.address) == early.amount


def test_an_entry_of_another_seller_reverts_the_whole_batch(chain: Chain) -> None:
    mine = make_terms(chain, seller=SELLER, operator=SELLER)
    theirs = make_terms(chain, seller=SELLER2, operator=SELLER2)
    deposit(chain, mine)
    deposit(chain, theirs)
    with expect_revert("NotSellerOrOperator", caller=address(SELLER), seller=address(SELLER2)):
        chain.escrow.deliver_many(chain.sender(SELLER), [(mine, HASH), (theirs, HASH)])
    assert chain.escrow.state_of(chain.escrow.id_of(mine)) is State.HELD


def test_a_refused_payout_puts_its_entries_back_and_the_rest_is_delivered(chain: Chain) -> None:
    """A token that refuses one seller: its entries are Held again, unchanged, and everyone else is paid."""
    blocking = chain.deploy_token("BlockingToken")
    block = chain.w3.eth.contract(abi=load_artifact("BlockingToken")["abi"]).encode_abi(
        "setBlocked", args=[address(SELLER2)]
    )
    chain.deployer.transact(blocking.address, bytes.fromhex(block.removeprefix("0x")))
    stuck = [make_terms(chain, token=blocking.address, seller=SELLER2, amount=a) for a in (1_000, 2_000)]
    paid = [make_terms(chain, seller=SELLER, amount=4_000), make_terms(chain, seller=SELLER2, amount=8_000)]
    for terms in stuck + paid:
        deposit(chain, terms)
    entries = [(paid[0], HASH), (stuck[0], HASH), (stuck[1], HASH), (paid[1], HASH)]
    data = _raw(chain, entries)
    assert _released_count(chain, OPERATOR, data) == 2
    receipt = chain.sender(OPERATOR).transact(chain.escrow.address, data)
    delivered = {e.id for e in chain.escrow.events_in(receipt) if isinstance(e, Delivered)}
    assert delivered == {chain.escrow.id_of(t) for t in paid}
    failures = chain.escrow.payout_failures_in(receipt)
    assert [(f.token, f.to, f.amount) for f in failures] == [(blocking.address, address(SELLER2), 3_000)]
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.HELD for t in stuck)
    assert blocking.balance_of(chain.escrow.address) == 3_000
    assert chain.token.balance_of(address(SELLER)) == 4_000
    assert chain.token.balance_of(address(SELLER2)) == 8_000
    # Held as before: once the token lets the seller receive again, the same delivery goes through.
    unblock = chain.w3.eth.contract(abi=load_artifact("BlockingToken")["abi"]).encode_abi("setBlocked", args=[ZERO])
    chain.deployer.transact(blocking.address, bytes.fromhex(unblock.removeprefix("0x")))
    chain.escrow.deliver_many(chain.sender(OPERATOR), [(t, HASH) for t in stuck])
    assert blocking.balance_of(address(SELLER2)) == 3_000


def test_too_little_gas_for_a_full_payout_allowance_reverts_by_name(chain: Chain) -> None:
    """Below the gas a payout needs, the batch fails whole and says so: never a payout starved into a restore."""
    terms = make_terms(chain)
    deposit(chain, terms)
    data = _raw(chain, [(terms, HASH)])
    # Plenty for the payout itself (a TestUSDC transfer costs about 30,000), short of its full allowance.
    gas = 100_000  # X402Escrow.PAYOUT_GAS: the allowance alone, without the 64/63 and the call's own cost
    receipt, revert = mine_at(chain, SELLER, data, chain.now() + 1, gas=gas)
    assert receipt["status"] == 0 and revert is not None
    assert revert.name == "InsufficientGas" and revert.args_by_name["left"] < revert.args_by_name["needed"]
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    # With the gas an estimate gives, the same batch delivers.
    chain.escrow.deliver_many(chain.sender(SELLER), [(terms, HASH)])
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.RELEASED
