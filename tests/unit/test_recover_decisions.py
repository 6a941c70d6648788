"""recover()'s decisions, without a chain: a journal entry and what the chain (and a replay) showed go in,
a Finding comes out (the report's item, the journal write, the ledger's chain-final word), applied once by
the driver. Each case is a lie or a failure recovery meets: a replay that fails, bytes that are not the ones
the chain committed, a settlement nobody received, an authorization that ran out.
"""

from __future__ import annotations

import httpx
from eth_utils.address import to_checksum_address

from escrow_py.buyer import PaymentState
from escrow_py.buyer._journal import JournalEntry
from escrow_py.buyer._judge import Verdict
from escrow_py.buyer._recover import Finding, RecoveryAction, judge_replay, judge_settled, judge_without_replay
from escrow_py.chain.escrow import LogPosition, Settled
from escrow_py.protocol.terms import State, Terms, delivery_hash

BUYER, SELLER, OPERATOR = (to_checksum_address(f"0x{n:040x}") for n in (0xB, 0x5, 0x0))
TOKEN, ESCROW = to_checksum_address("0x" + "70" * 20), to_checksum_address("0x" + "e5" * 20)
ESCROW_ID = b"\x11" * 32
DEADLINE, VALID_BEFORE = 2_000_000_000, 1_999_999_000
BODY, OTHER_BODY = b'{"report": 1}', b'{"report": "another"}'
SETTLE_TX = b"\x5e" * 32

TERMS = Terms(
    buyer=BUYER, seller=SELLER, operator=OPERATOR, token=TOKEN, amount=10_000, deadline=DEADLINE,
    request_hash=b"\x00" * 32, salt=b"\x01" * 32,
)  # fmt: skip


def entry(state: PaymentState = PaymentState.HELD, *, response_hash: bytes | None = None) -> JournalEntry:
    return JournalEntry(
        escrow_id=ESCROW_ID, chain_id=31337, escrow=ESCROW, method="GET", url="http://shop/report", headers={},
        body=b"", terms=TERMS, valid_before=VALID_BEFORE, payment_header="e30=", state=state, detail=None,
        response_hash=response_hash, committed_hash=None, tx_hash=None, created_at=1_700_000_000.0,
    )  # fmt: skip


def settled(hash_: bytes) -> Settled:
    return Settled(ESCROW_ID, hash_, LogPosition(7, b"\xbb" * 32, SETTLE_TX, 0))


# -- a replay of a payment the seller was paid for, judged by the chain's hash ----------------------------


def test_a_replay_whose_bytes_match_the_chain_is_delivered_and_returns_the_bytes() -> None:
    found = judge_replay(entry(), httpx.Response(200, content=BODY), delivery_hash(BODY), chain_state=State.RELEASED)
    assert found.item.action is RecoveryAction.REPLAYED
    assert found.item.journal_state is PaymentState.DELIVERED and found.item.body == BODY
    assert found.verdict == Verdict(
        PaymentState.DELIVERED, response_hash=delivery_hash(BODY), committed_hash=delivery_hash(BODY)
    )
    assert found.spent is None  # the ledger's final word comes from reconcile_ledger, after the chain is final


def test_a_replay_whose_bytes_differ_from_the_chain_is_a_mismatch_and_hands_back_no_bytes() -> None:
    # The seller answers with a header that would vouch for its bytes; the chain's hash is the judge.
    found = judge_replay(
        entry(), httpx.Response(200, content=OTHER_BODY), delivery_hash(BODY), chain_state=State.RELEASED
    )
    assert found.item.journal_state is PaymentState.MISMATCH and found.item.body is None
    assert found.verdict is not None and found.verdict.state is PaymentState.MISMATCH
    assert found.verdict.response_hash == delivery_hash(OTHER_BODY)
    assert found.verdict.committed_hash == delivery_hash(BODY)
    assert "0x" + delivery_hash(BODY).hex() in found.item.outcome


def test_a_replay_with_no_hash_found_on_chain_is_a_mismatch_never_a_delivery() -> None:
    found = judge_replay(entry(), httpx.Response(200, content=BODY), None, chain_state=State.RELEASED)
    assert found.item.journal_state is PaymentState.MISMATCH
    assert "chain has none" in found.item.outcome


def test_a_failed_replay_writes_nothing_and_says_the_money_is_paid_out() -> None:
    for answer in (httpx.Response(502, content=b"bad gateway"), httpx.ConnectError("refused")):
        found = judge_replay(entry(), answer, delivery_hash(BODY), chain_state=State.RELEASED)
        assert found.verdict is None and found.spent is None
        assert found.item.journal_state is PaymentState.HELD  # unchanged: recover() tries again next time
        assert "paid out" in found.item.outcome


# -- a served-first payment the chain shows settled ----------------------------------------------------


def test_settled_with_the_bytes_received_is_delivered_and_spent() -> None:
    found = judge_settled(
        entry(PaymentState.UNSETTLED, response_hash=delivery_hash(BODY)), settled(delivery_hash(BODY))
    )
    assert found.item.action is RecoveryAction.MARKED_SETTLED and found.item.tx_hash == SETTLE_TX
    assert found.verdict == Verdict(PaymentState.DELIVERED, committed_hash=delivery_hash(BODY), tx_hash=SETTLE_TX)
    assert found.spent is True


def test_settled_with_another_hash_than_the_bytes_received_is_a_mismatch_and_still_spent() -> None:
    found = judge_settled(
        entry(PaymentState.UNSETTLED, response_hash=delivery_hash(BODY)), settled(delivery_hash(OTHER_BODY))
    )
    assert found.verdict is not None and found.verdict.state is PaymentState.MISMATCH
    assert found.verdict.committed_hash == delivery_hash(OTHER_BODY)
    assert found.spent is True  # the money went to the seller whatever it committed to


def test_settled_with_no_bytes_received_is_spent_but_leaves_the_journal_waiting() -> None:
    found = judge_settled(entry(PaymentState.SIGNED), settled(delivery_hash(BODY)))
    assert found.item.action is RecoveryAction.WAITING and found.verdict is None and found.spent is True


# -- nothing to replay: the escrow's state and the chain's clock decide -------------------------------


def test_held_past_the_deadline_is_refunded_by_the_buyer_or_left_to_the_keeper() -> None:
    assert judge_without_replay(entry(), State.HELD, DEADLINE, refund_expired=True) is None  # the refund is an act
    left = judge_without_replay(entry(), State.HELD, DEADLINE, refund_expired=False)
    assert left is not None and left.item.action is RecoveryAction.LEFT_TO_KEEPER
    assert left.verdict == Verdict(PaymentState.HELD, "expired; left to the keeper")


def test_refunded_on_chain_is_recorded_refunded() -> None:
    found = judge_without_replay(entry(), State.REFUNDED, DEADLINE + 1, refund_expired=True)
    assert found is not None
    assert found == Finding(found.item, Verdict(PaymentState.REFUNDED, "refunded on chain"))
    assert found.item.action is RecoveryAction.MARKED_REFUNDED


def test_never_deposited_is_void_only_once_the_authorization_has_expired_by_the_chains_clock() -> None:
    waiting = judge_without_replay(entry(PaymentState.UNSETTLED), State.NONE, VALID_BEFORE - 1, refund_expired=True)
    assert waiting is not None and waiting.item.action is RecoveryAction.WAITING and waiting.verdict is None
    assert "served first; not settled yet" in waiting.item.outcome
    void = judge_without_replay(entry(PaymentState.UNSETTLED), State.NONE, VALID_BEFORE, refund_expired=True)
    assert void is not None and void.item.action is RecoveryAction.MARKED_VOID
    assert void.verdict is not None and void.verdict.state is PaymentState.VOID


def test_held_in_time_with_no_request_journaled_waits() -> None:
    found = judge_without_replay(entry(), State.HELD, DEADLINE - 1, refund_expired=True)
    assert found is not None and found.item.action is RecoveryAction.WAITING and found.verdict is None
