"""X402Escrow.settleMany: serve-first settlements in a batch.

An entry whose pull fails (the buyer moved its funds, cancelled or reused the authorization) or whose
deadline passed is skipped and reported, in the return value and in a SettlementSkipped event; it never
reverts the batch. Payouts to one seller are paid in one transfer. The batch reverts only on what a
buggy caller sends, on a refused payout (the pulled funds have no Held state to go back to), and when
sent with too little gas to tell a failed pull from a starved one.
"""

from __future__ import annotations

from collections import Counter

from eth_abi.abi import decode
from eth_utils.crypto import keccak
from fixtures.chain import BUYER, BUYER2, OPERATOR, SELLER, SELLER2, STRANGER, Chain
from helpers import (
    address,
    cancel_authorization,
    deposit,
    expect_revert,
    make_terms,
    mine_at,
    sign_deposit,
)
from web3.types import TxReceipt

from escrow_devtools.artifacts import load_artifact
from escrow_py.chain.escrow import Settled, Settlement, SettlementSkipped, SkipReason
from escrow_py.protocol.eip3009 import TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.terms import Terms, delivery_hash

TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")


def signed(chain: Chain, terms: Terms, delivery: bytes | None = None) -> Settlement:
    auth, signature = sign_deposit(chain, terms)
    return Settlement(terms, auth, signature, delivery or delivery_hash(terms.salt))


def _raw(chain: Chain, entries: list[Settlement]) -> bytes:
    """settleMany calldata in exactly this order (the binding sorts by token and seller)."""
    data = chain.escrow.contract.encode_abi("settleMany", args=[[e.as_tuple() for e in entries]])
    return bytes.fromhex(data.removeprefix("0x"))


def _payouts(chain: Chain, receipt: TxReceipt) -> list[tuple[str, str, int]]:
    """(token, to, amount) of every transfer out of the escrow in the receipt."""
    out: list[tuple[str, str, int]] = []
    for log in receipt["logs"]:
        topics = [bytes(t) for t in log["topics"]]
        if topics and topics[0] == TRANSFER_TOPIC and topics[1][12:] == bytes.fromhex(chain.escrow.address[2:]):
            to = "0x" + topics[2][12:].hex()
            out.append((log["address"], chain.w3.to_checksum_address(to), int.from_bytes(bytes(log["data"]), "big")))
    return out


def test_every_entry_is_settled_and_one_seller_is_paid_once(chain: Chain) -> None:
    entries = [signed(chain, make_terms(chain, buyer=b, amount=a)) for b, a in ((BUYER, 1_000), (BUYER2, 2_000))]
    entries += [signed(chain, make_terms(chain, buyer=BUYER, amount=4_000))]
    result = chain.escrow.simulate_settle_many(chain.sender(OPERATOR), entries)
    assert (result.settled, result.skipped) == (3, [])
    receipt = chain.escrow.settle_many(chain.sender(OPERATOR), entries)
    settled = chain.escrow.settlements_in(receipt)
    assert [(e.id, e.delivery_hash) for e in settled if isinstance(e, Settled)] == [
        (chain.escrow.id_of(e.terms), e.delivery_hash) for e in chain.escrow.order_for_payout(entries)
    ]
    assert _payouts(chain, receipt) == [(chain.token.address, address(SELLER), 7_000)]
    assert chain.token.balance_of(address(SELLER)) == 7_000
    assert chain.token.balance_of(chain.escrow.address) == 0


def test_entries_whose_pull_fails_are_skipped_and_reported_with_their_reason(chain: Chain) -> None:
    good = [make_terms(chain, buyer=BUYER2, amount=1_000 * (i + 1)) for i in range(3)]
    settled_before = make_terms(chain, buyer=BUYER2)
    deposited = make_terms(chain, buyer=BUYER2)
    cancelled = make_terms(chain, buyer=BUYER2)
    broke = make_terms(chain, buyer=BUYER, amount=5_000)
    no_code = make_terms(chain, token=address(STRANGER), buyer=BUYER2)
    chain.escrow.settle(chain.sender(SELLER), signed(chain, settled_before))
    deposit(chain, deposited)
    cancelled_entry = signed(chain, cancelled)
    cancel_authorization(chain, cancelled)
    broke_entry = signed(chain, broke)
    chain.token.transfer(chain.sender(BUYER), address(STRANGER), chain.token.balance_of(address(BUYER)) - 4_999)
    auth = authorization_for(no_code, chain.escrow.address, chain.escrow.chain_id, 0, no_code.deadline)
    no_code_signature = sign_authorization(
        chain.signer(BUYER2),
        TokenDomain(name="USDC", version="2", chain_id=chain.escrow.chain_id, verifying_contract=no_code.token),
        auth,
    )
    entries = [
        signed(chain, good[0]),
        signed(chain, settled_before),
        broke_entry,
        signed(chain, good[1]),
        signed(chain, deposited),
        Settlement(no_code, auth, no_code_signature, delivery_hash(b"x")),
        cancelled_entry,
        signed(chain, good[2]),
        signed(chain, good[0]),  # the same entry twice: its nonce is spent by the first
    ]
    skipped_reasons = {
        1: SkipReason.PULL_FAILED,
        2: SkipReason.INSUFFICIENT_BALANCE,
        4: SkipReason.PULL_FAILED,
        5: SkipReason.NOT_A_CONTRACT,
        6: SkipReason.PULL_FAILED,
        8: SkipReason.PULL_FAILED,
    }
    data = _raw(chain, entries)
    settled, skipped = _simulate(chain, SELLER, data)
    assert (settled, skipped) == (3, sorted(skipped_reasons))
    seller_before = chain.token.balance_of(address(SELLER))
    receipt = chain.sender(SELLER).transact(chain.escrow.address, data)
    events = chain.escrow.settlements_in(receipt)
    assert [e.id for e in events if isinstance(e, Settled)] == [chain.escrow.id_of(t) for t in good]
    assert [(e.id, e.reason) for e in events if isinstance(e, SettlementSkipped)] == [
        (chain.escrow.id_of(entries[i].terms), reason) for i, reason in sorted(skipped_reasons.items())
    ]
    assert chain.token.balance_of(address(SELLER)) == seller_before + 6_000
    assert chain.token.balance_of(address(BUYER)) == 4_999  # the buyer who moved its funds paid nothing
    assert chain.token.balance_of(chain.escrow.address) == deposited.amount  # still Held, untouched
    # The buyer who moved its funds is skipped on a balance look-up, before the token writes its nonce.
    assert not chain.token.authorization_state(broke.buyer, chain.escrow.id_of(broke))


def _simulate(chain: Chain, who: int, data: bytes) -> tuple[int, list[int]]:
    settled, skipped = decode(["uint256", "uint256[]"], chain.sender(who).call(chain.escrow.address, data))
    return int(settled), [int(i) for i in skipped]


def test_an_entry_that_crosses_its_deadline_after_the_simulation_is_skipped(chain: Chain) -> None:
    early, late = make_terms(chain, window=50), make_terms(chain, window=5_000)
    data = _raw(chain, [signed(chain, late), signed(chain, early)])
    assert _simulate(chain, SELLER, data) == (2, [])  # the poster's simulation
    receipt, revert = mine_at(chain, SELLER, data, early.deadline)  # included at the deadline
    assert revert is None
    events = chain.escrow.settlements_in(receipt)
    assert [(type(e), e.id) for e in events] == [
        (Settled, chain.escrow.id_of(late)),
        (SettlementSkipped, chain.escrow.id_of(early)),
    ]
    assert isinstance(events[1], SettlementSkipped) and events[1].reason is SkipReason.DEADLINE_PASSED
    assert chain.token.balance_of(address(SELLER)) == late.amount
    assert not chain.token.authorization_state(early.buyer, chain.escrow.id_of(early))


def test_interleaved_sellers_and_tokens_each_get_their_due(chain: Chain) -> None:
    usdc2 = chain.deploy_token()
    tokens = [chain.token, usdc2]
    plan = [(0, SELLER, 1_000), (1, SELLER, 2_000), (0, SELLER2, 3_000), (0, SELLER, 5_000), (1, SELLER2, 7_000)]
    entries, due = [], Counter[tuple[int, int]]()
    for token, seller, amount in plan:
        terms = make_terms(chain, token=tokens[token].address, seller=seller, amount=amount)
        entries.append(signed(chain, terms))
        due[(token, seller)] += amount
    receipt = chain.sender(OPERATOR).transact(chain.escrow.address, _raw(chain, entries))
    for (token, seller), amount in due.items():
        assert tokens[token].balance_of(address(seller)) == amount
    assert len(_payouts(chain, receipt)) == len(plan)  # unsorted: a transfer per run of one (token, seller)
    receipt = chain.escrow.settle_many(
        chain.sender(OPERATOR),
        [signed(chain, make_terms(chain, token=tokens[t].address, seller=s)) for t, s, _ in plan],
    )
    assert len(_payouts(chain, receipt)) == len(due)  # the binding sorts: one transfer per (token, seller)


def test_what_only_a_buggy_caller_sends_reverts_the_batch(chain: Chain) -> None:
    fine = signed(chain, make_terms(chain))
    theirs = signed(chain, make_terms(chain, seller=SELLER2, operator=SELLER2))
    with expect_revert("NotSellerOrOperator", caller=address(SELLER), seller=address(SELLER2)):
        chain.sender(SELLER).transact(chain.escrow.address, _raw(chain, [fine, theirs]))
    unset = signed(chain, make_terms(chain), bytes(32))
    with expect_revert("ZeroDeliveryHash", id=chain.escrow.id_of(unset.terms)):
        chain.sender(SELLER).transact(chain.escrow.address, _raw(chain, [fine, unset]))
    with expect_revert("ZeroAmount"):
        chain.sender(SELLER).transact(
            chain.escrow.address, _raw(chain, [fine, signed(chain, make_terms(chain, amount=0))])
        )
    assert chain.token.balance_of(address(SELLER)) == 0
    assert not chain.token.authorization_state(fine.terms.buyer, chain.escrow.id_of(fine.terms))


def test_a_refused_payout_reverts_the_batch_and_pulls_nothing(chain: Chain) -> None:
    token = chain.deploy_token("BlockingToken")
    blocking = chain.w3.eth.contract(abi=load_artifact("BlockingToken")["abi"])
    block = blocking.encode_abi("setBlocked", args=[address(SELLER2)])
    chain.deployer.transact(token.address, bytes.fromhex(block.removeprefix("0x")))
    entries = [signed(chain, make_terms(chain, token=token.address, seller=s, amount=1_000)) for s in (SELLER, SELLER2)]
    with expect_revert("TransferFailed", token=token.address, to=address(SELLER2), amount=1_000):
        chain.escrow.settle_many(chain.sender(OPERATOR), entries)
    assert token.balance_of(chain.escrow.address) == 0
    assert token.balance_of(address(SELLER)) == 0
    assert not token.authorization_state(entries[0].terms.buyer, chain.escrow.id_of(entries[0].terms))


def test_too_little_gas_to_give_a_pull_its_allowance_reverts_by_name(chain: Chain) -> None:
    """Never a pull starved by a short gas limit and reported as the buyer's failure."""
    entry = signed(chain, make_terms(chain))
    # Plenty for the pull itself (about 50,000), short of X402Escrow.PULL_GAS and the reserve behind it.
    receipt, revert = mine_at(chain, SELLER, _raw(chain, [entry]), chain.now() + 1, gas=300_000)
    assert receipt["status"] == 0 and revert is not None and revert.name == "InsufficientGas"
    assert not chain.token.authorization_state(entry.terms.buyer, chain.escrow.id_of(entry.terms))
    chain.escrow.settle_many(chain.sender(SELLER), [entry])  # with the estimate's gas it settles
    assert chain.token.balance_of(address(SELLER)) == entry.terms.amount


def test_the_binding_maps_skipped_indexes_back_to_entries(chain: Chain) -> None:
    cancelled = make_terms(chain, buyer=BUYER2)
    entries = [
        signed(chain, make_terms(chain, seller=SELLER2)),
        signed(chain, cancelled),
        signed(chain, make_terms(chain)),
    ]
    cancel_authorization(chain, cancelled)
    result = chain.escrow.simulate_settle_many(chain.sender(OPERATOR), entries)
    assert result.settled == 2 and [e.terms for e in result.skipped] == [cancelled]


def test_an_empty_batch_settles_nothing(chain: Chain) -> None:
    assert chain.escrow.simulate_settle_many(chain.sender(STRANGER), []).settled == 0
