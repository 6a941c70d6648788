"""The buyer's pure steps, without a chain: decide (the policy's offer rules) and judge (an answer, given
the chain facts it names, is a Verdict: what to journal and what to raise), and the one payment flow
driven by hand, as the sync and async drivers drive it.

Every answer here is the seller's lie or failure as it would arrive on the wire (x402 headers built
with the package's own codecs); the chain facts are what a node would say, or the error it raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_utils.address import to_checksum_address
from x402.schemas import SettleResponse

from escrow_py.buyer import (
    DeliveryMismatch,
    HandlerFailedRefunded,
    Journal,
    PaymentNotDelivered,
    PaymentRejected,
    PaymentState,
    Policy,
    PolicyDenied,
)
from escrow_py.buyer._decide import decide, denial, payment_context
from escrow_py.buyer._judge import Answer, ChainFacts, Kind, Need, Verdict, judge, read_answer
from escrow_py.buyer._validate import TASK_EXTENSION
from escrow_py.protocol.errors import RpcError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms, delivery_hash, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    EscrowExtra,
    EscrowRequirements,
    SettlementExtra,
    SettlementMode,
    SettlementStatus,
    encode_payment_required,
    encode_payment_response,
    payment_required,
)

BUYER, SELLER, OPERATOR = (to_checksum_address(f"0x{n:040x}") for n in (0xB, 0x5, 0x0))
TOKEN, ESCROW = to_checksum_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e"), to_checksum_address("0x" + "e5" * 20)
ESCROW_ID, OTHER_ID = b"\x11" * 32, b"\x22" * 32
DEADLINE, VALID_BEFORE = 2_000_000_000, 2_000_000_000
BODY, OTHER_BODY = b'{"report": 1}', b'{"report": "another"}'


TERMS = Terms(
    buyer=BUYER, seller=SELLER, operator=OPERATOR, token=TOKEN, amount=10_000, deadline=DEADLINE,
    request_hash=b"\x00" * 32, salt=b"\x01" * 32,
)  # fmt: skip
NO_FACTS = ChainFacts()


@dataclass(frozen=True)
class Paid:
    """A payment as the judge sees it (a Prepared one or a journal row)."""

    escrow_id: bytes = ESCROW_ID
    terms: Terms = TERMS
    escrow: str = ESCROW
    valid_before: int = VALID_BEFORE


PAID = Paid()


def receipt(status: int, body: bytes = BODY, *, error: str | None = None, **extra: object) -> httpx.Response:
    """An answer with a PAYMENT-RESPONSE whose extra says `extra` (escrow id and the body's hash by default)."""
    fields: dict[str, object] = {"escrow_id": ESCROW_ID, "deadline": DEADLINE, "delivery_hash": delivery_hash(body)}
    fields.update(extra)
    settle = SettleResponse(success=error is None, error_reason=error, transaction="", network="eip155:84532",
                            payer=BUYER, extra=SettlementExtra.model_validate(fields).to_json())  # fmt: skip
    return httpx.Response(status, content=body, headers={PAYMENT_RESPONSE_HEADER: encode_payment_response(settle)})


def judged(response: httpx.Response, facts: ChainFacts = NO_FACTS, *, replay: bool = False) -> tuple[Answer, Verdict]:
    answer = read_answer(response, ESCROW_ID, replay=replay)
    return answer, judge(answer, PAID, facts)


# -- judge: a delivery ---------------------------------------------------------------------------


def test_a_body_matching_the_committed_hash_is_delivered_and_needs_no_chain() -> None:
    answer, verdict = judged(receipt(200))
    assert answer.needs is Need.NOTHING
    assert verdict.state is PaymentState.DELIVERED and verdict.error is None
    assert verdict.response_hash == verdict.committed_hash == delivery_hash(BODY)


def test_a_body_that_is_not_the_one_committed_is_a_mismatch_naming_both_hashes() -> None:
    # The lie: the seller committed to one body and sent another.
    _, verdict = judged(receipt(200, OTHER_BODY, delivery_hash=delivery_hash(BODY)))
    assert verdict.state is PaymentState.MISMATCH and isinstance(verdict.error, DeliveryMismatch)
    assert verdict.error.committed == delivery_hash(BODY) and verdict.error.received == delivery_hash(OTHER_BODY)


def test_a_posted_delivery_is_judged_by_the_chain_not_the_header() -> None:
    # The lie: a replica re-ran the handler and sent other bytes with their own hash in the header.
    tx = b"\x33" * 32
    answer, verdict = judged(
        receipt(200, OTHER_BODY, delivery_transaction=tx), ChainFacts(posted_hash=delivery_hash(BODY))
    )
    assert answer.kind is Kind.POSTED_DELIVERY and answer.needs is Need.POSTED_HASH
    assert verdict.state is PaymentState.MISMATCH and isinstance(verdict.error, DeliveryMismatch)
    assert verdict.committed_hash == delivery_hash(BODY)
    _, verdict = judged(receipt(200, BODY, delivery_transaction=tx), ChainFacts(posted_hash=delivery_hash(BODY)))
    assert verdict.state is PaymentState.DELIVERED and verdict.error is None


def test_a_replay_goes_to_the_chain_and_a_held_escrow_keeps_the_header_hash() -> None:
    answer, verdict = judged(receipt(200), ChainFacts(state=State.HELD), replay=True)
    assert answer.needs is Need.POSTED_HASH
    assert verdict.state is PaymentState.DELIVERED and verdict.committed_hash == delivery_hash(BODY)


def test_a_posted_hash_that_cannot_be_read_says_where_the_money_is_and_journals_nothing() -> None:
    failure = RpcError("searching the Delivered event: connection refused")
    _, verdict = judged(receipt(200, delivery_transaction=b"\x33" * 32), ChainFacts(hash_error=failure))
    assert verdict.state is None and isinstance(verdict.error, PaymentNotDelivered)
    assert verdict.error.__cause__ is failure and "on-chain hash could not be read" in str(verdict.error)


@pytest.mark.parametrize("status", [SettlementStatus.PENDING, SettlementStatus.SETTLED])
def test_a_served_first_delivery_is_unsettled_never_judged_by_a_delivered_event(status: SettlementStatus) -> None:
    answer, verdict = judged(receipt(200, settlement=status, state="released"))
    assert answer.needs is Need.NOTHING  # served first: no escrow, so no Delivered event to ask for
    assert verdict.state is PaymentState.UNSETTLED and verdict.error is None
    assert verdict.detail == f"served first; settlement {status.value}"


# -- judge: no delivery ---------------------------------------------------------------------------


def refusal(status: int, *, error: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    extra = dict(headers or {})
    if error is not None:
        extra[PAYMENT_REQUIRED_HEADER] = encode_payment_required(payment_required("http://shop.test/", [], error=error))
    return httpx.Response(status, headers=extra)


def test_a_refused_payment_never_deposited_is_rejected_with_the_sellers_reason() -> None:
    answer, verdict = judged(refusal(402, error="invalid_signature"), ChainFacts(state=State.NONE))
    assert answer.needs is Need.STATE
    assert verdict.state is PaymentState.REJECTED and isinstance(verdict.error, PaymentRejected)
    assert verdict.error.reason == "invalid_signature" and verdict.detail == "402 invalid_signature"


def test_a_refusal_whose_escrow_is_held_is_not_delivered_and_names_the_state() -> None:
    # The lie: the seller deposited the money, then refused the request.
    _, verdict = judged(refusal(402, error="invalid_signature"), ChainFacts(state=State.HELD))
    assert verdict.state is PaymentState.HELD and isinstance(verdict.error, PaymentNotDelivered)
    assert "escrow is HELD" in str(verdict.error)


def test_a_seller_unavailable_with_a_deposit_pending_stays_signed() -> None:
    body = json.dumps({"error": Reason.DEPOSIT_PENDING.value, "message": "mining"}).encode()
    unavailable = httpx.Response(503, content=body, headers={"retry-after": "2"})
    _, verdict = judged(unavailable, ChainFacts(state=State.NONE))
    assert verdict.state is PaymentState.SIGNED and isinstance(verdict.error, PaymentNotDelivered)
    assert "may still land before" in str(verdict.error)


def test_a_state_that_cannot_be_read_after_the_payment_left_journals_nothing_and_says_where_the_money_is() -> None:
    failure = RpcError("reading the state: timed out")
    _, verdict = judged(refusal(500), ChainFacts(state_error=failure))
    assert verdict.state is None and isinstance(verdict.error, PaymentNotDelivered)
    assert verdict.error.__cause__ is failure
    assert f"unless the signed authorization is deposited before {VALID_BEFORE}" in str(verdict.error)


def test_a_failed_handler_is_refunded_only_when_the_chain_says_so() -> None:
    refund_tx = b"\x44" * 32
    failed = receipt(500, b"oops", error=Reason.HANDLER_FAILED_REFUNDED.value, refund_transaction=refund_tx)
    _, verdict = judged(failed, ChainFacts(state=State.REFUNDED))
    assert verdict.state is PaymentState.REFUNDED and isinstance(verdict.error, HandlerFailedRefunded)
    assert verdict.tx_hash == refund_tx
    # The lie: the seller says refunded, the chain says the money is still held.
    _, verdict = judged(failed, ChainFacts(state=State.HELD))
    assert verdict.state is PaymentState.HELD and isinstance(verdict.error, PaymentNotDelivered)
    assert "still HELD" in str(verdict.error)


def test_a_served_first_handler_failure_costs_nothing_and_asks_no_chain() -> None:
    failed = receipt(500, b"oops", error=Reason.HANDLER_FAILED_NOT_CHARGED.value)
    answer, verdict = judged(failed)
    assert answer.needs is Need.NOTHING
    assert verdict.state is PaymentState.REJECTED and isinstance(verdict.error, PaymentRejected)


def test_a_receipt_for_another_escrow_or_an_unreadable_one_is_held_not_delivered() -> None:
    _, verdict = judged(receipt(200, escrow_id=OTHER_ID))
    assert verdict.state is PaymentState.HELD and isinstance(verdict.error, PaymentNotDelivered)
    assert f"names escrow 0x{OTHER_ID.hex()} instead" in str(verdict.error)
    garbled = httpx.Response(200, content=BODY, headers={PAYMENT_RESPONSE_HEADER: "not base64 json"})
    answer, verdict = judged(garbled)
    assert answer.kind is Kind.UNREADABLE and verdict.state is PaymentState.HELD
    assert isinstance(verdict.error, PaymentNotDelivered) and "unreadable PAYMENT-RESPONSE" in str(verdict.error)


# -- decide ----------------------------------------------------------------------------------------


def offer(settlement: SettlementMode = SettlementMode.HOLD) -> EscrowRequirements:
    extra = EscrowExtra(
        name="USDC", version="2", escrow=ESCROW, operator=OPERATOR,
        request_hash=request_hash("GET", "https://api.test/r"), settlement=settlement,
    )  # fmt: skip
    return EscrowRequirements(
        network="eip155:84532", amount=10_000, asset=TOKEN, pay_to=SELLER, max_timeout_seconds=300, extra=extra
    )


def test_the_context_takes_the_host_from_the_request_and_the_task_from_its_extension() -> None:
    request = httpx.Request("GET", "https://api.test/r", extensions={TASK_EXTENSION: "research"})
    ctx = payment_context(request, offer(), TERMS, "default")
    assert (ctx.host, ctx.task, ctx.amount, ctx.deadline_seconds) == ("api.test", "research", 10_000, 300)
    sdk = payment_context(None, offer(SettlementMode.SERVE_FIRST), TERMS, "default")
    assert (sdk.host, sdk.task, sdk.settlement) == (None, "default", "serve-first")


def test_decide_applies_the_offer_rules_and_allows_without_a_policy() -> None:
    ctx = payment_context(httpx.Request("GET", "https://api.test/r"), offer(), TERMS, "default")
    assert decide(ctx, None).allowed
    assert decide(ctx, Policy(max_per_request=10_000, hosts=frozenset({"api.test"}))).allowed
    over = decide(ctx, Policy(max_per_request=9_999))
    assert not over.allowed and over.reason is Reason.OVER_PER_REQUEST and over.limit == 9_999
    error = denial(over)
    assert isinstance(error, PolicyDenied) and error.code == "over_per_request" and error.wanted == 10_000
    assert decide(ctx, Policy(settlement="serve-first")).reason is Reason.SETTLEMENT_NOT_ALLOWED
    # Budgets are not decide's: they need the ledger, and the journal decides them under its lock.
    assert decide(ctx, Policy(total_budget=1)).allowed


def test_the_journal_decides_only_the_budgets_never_the_offer_rules_again(tmp_path: Path) -> None:
    ctx = payment_context(httpx.Request("GET", "https://api.test/r"), offer(), TERMS, "default")
    journal = Journal(tmp_path / "buyer.sqlite", audit=False)
    try:
        # The offer rules were decide's: an offer rule the ledger sees must not be run a second time.
        reserved = journal.reserve(ESCROW_ID, TERMS, ctx, Policy(max_per_request=1, total_budget=10_000))
        assert reserved.allowed
        over = journal.reserve(OTHER_ID, TERMS, ctx, Policy(max_per_request=1, total_budget=10_000))
        assert over.reason is Reason.OVER_TOTAL_BUDGET and over.available == 0
        assert [(row.escrow_id, row.amount) for row in journal.ledger_rows()] == [(ESCROW_ID, 10_000)]
    finally:
        journal.close()
