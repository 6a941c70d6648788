"""The seller's payment state machine as a pure function: a table of (header, request, row, chain facts) -> step.

No anvil, no store, no network: every input is a plain value built here, signed with anvil's
well-known dev keys, so each case states exactly what the seller must do next.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from helpers import BUYER, STRANGER

from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import EscrowRequirements, SettlementStatus, decode_payment_response
from escrow_py.seller._machine import (
    Adopt,
    ChainFacts,
    Deposit,
    DepositFault,
    Facts,
    Forget,
    ParsedPayment,
    Reject,
    Replay,
    ResumeDeposit,
    Route,
    Rules,
    Serve,
    ServeFirst,
    Step,
    Unavailable,
    after_deposit_fault,
    after_reserve,
    decide,
    facts_needed,
    handler_failed,
    kept,
    needs_chain_state_for_replay,
    parse_payment,
    replayed,
    served,
)
from escrow_py.seller._store import (
    DeliveryRecord,
    DeliveryStatus,
    Payment,
    PaymentStatus,
    Reserve,
    SettlementRecord,
    SettleStatus,
    StoredResponse,
)

from .test_verify import CHAIN_ID, ESCROW, NOW, _header, _offer, _pay, _set

RULES = Rules(min_time_left=10, deadline_slack=30)
HOLD = Route()
SERVE_FIRST = Route(serve_first=True, fallback_to_hold=True)
SERVE_FIRST_ONLY = Route(serve_first=True, fallback_to_hold=False)
TX = b"\x0d" * 32
RESPONSE = StoredResponse(200, [(b"content-type", b"text/plain")], b"the report")


class Case:
    """One payment for the default offer, and the row the store could hold for it."""

    def __init__(self, *, ttl: int = 100, signer: int = BUYER, mutate: Callable[[dict[str, Any]], None] | None = None):
        self.offer = _offer()
        payload, accepted = _pay(self.offer, ttl=ttl, signer=signer)
        self.payload = payload
        self.header = _header(payload, accepted, mutate)
        self.parsed = parse_payment(self.header, chain_id=CHAIN_ID, escrow=ESCROW)

    @property
    def escrow_id(self) -> bytes:
        return self.payload.terms.escrow_id(CHAIN_ID, ESCROW)

    def row(
        self, status: str = PaymentStatus.DEPOSITING, *, response: StoredResponse | None = None, **fields: Any
    ) -> Payment:
        values: dict[str, Any] = {
            "escrow_id": self.escrow_id,
            "terms": self.payload.terms,
            "status": status,
            "accepted_at": NOW,
            "deposit_tx": None,
            "refund_tx": None,
            "response": response,
        }
        values.update(fields)
        return Payment(**values)


def _decide(
    case: Case,
    row: Payment | None = None,
    chain: ChainFacts | None = None,
    route: Route = HOLD,
    offer: EscrowRequirements | None = None,
) -> Step:
    return decide(
        case.parsed,
        offer or case.offer,
        route=route,
        row=row,
        chain=chain or ChainFacts(now=NOW),
        rules=RULES,
    )


def _rejected(step: Step) -> Reason:
    assert isinstance(step, Reject), step
    return Reason(step.rejected.reason)


# -- the header, decoded once --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason", "status"),
    [
        ("%%%not-base64%%%", Reason.INVALID_PAYLOAD, 400),
        (base64.b64encode(b"[]").decode(), Reason.INVALID_PAYLOAD, 400),
        ("A" * 20_000, Reason.HEADER_TOO_LARGE, 400),
    ],
)
def test_an_undecodable_header_is_rejected_with_400_before_anything_is_read(
    header: str, reason: Reason, status: int
) -> None:
    parsed = parse_payment(header, chain_id=CHAIN_ID, escrow=ESCROW)
    assert parsed.rejected is not None and parsed.escrow_id is None and not parsed.exact
    assert (parsed.rejected.reason, parsed.rejected.status) == (reason, status)
    step = decide(parsed, _offer(), route=HOLD, row=None, chain=ChainFacts(now=NOW), rules=RULES)
    assert _rejected(step) == reason


def test_a_malformed_payload_inside_a_good_envelope_is_rejected_and_names_no_escrow() -> None:
    case = Case(mutate=_set("payload.signature", "0xzz"))
    assert case.parsed.escrow_id is None and case.parsed.envelope is not None
    assert _rejected(_decide(case)) == Reason.INVALID_PAYLOAD


def test_the_header_is_decoded_once_into_the_payload_and_its_escrow_id() -> None:
    case = Case()
    assert case.parsed.rejected is None and not case.parsed.exact
    assert case.parsed.payload == case.payload
    assert case.parsed.escrow_id == case.escrow_id


def test_an_exact_scheme_payment_is_told_apart_and_not_decided_here() -> None:
    case = Case(mutate=_set("accepted.scheme", "exact"))
    assert case.parsed.exact and case.parsed.payload is None and case.parsed.escrow_id is None


# -- a payment seen for the first time -----------------------------------------------------------


def test_a_new_valid_hold_payment_is_deposited_and_recorded_at_the_chain_time() -> None:
    case = Case()
    step = _decide(case, chain=ChainFacts(now=NOW, state=State.NONE))
    assert isinstance(step, Deposit)
    assert step.accepted_at == NOW and step.verified.escrow_id == case.escrow_id
    assert step.envelope is case.parsed.envelope  # the seller's hooks see the one decoded envelope


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set("accepted.amount", "1"), Reason.AMOUNT_MISMATCH),
        (_set("accepted.payTo", "0x" + "99" * 20), Reason.RECEIVER_MISMATCH),
        (_set("accepted.network", "eip155:1"), Reason.NETWORK_MISMATCH),
        (_set("payload.terms.amount", "1"), Reason.AMOUNT_MISMATCH),
    ],
)
def test_wrong_terms_are_rejected_with_the_rule_they_break(
    mutate: Callable[[dict[str, Any]], None], reason: Reason
) -> None:
    assert _rejected(_decide(Case(mutate=mutate))) == reason


def test_a_payment_signed_by_someone_else_is_rejected() -> None:
    assert _rejected(_decide(Case(signer=STRANGER))) == Reason.INVALID_SIGNATURE


def test_a_payment_for_another_request_is_rejected() -> None:
    other = _offer(url="http://127.0.0.1:8000/report/8")
    assert _rejected(_decide(Case(), offer=other)) == Reason.REQUEST_HASH_MISMATCH


def test_a_new_serve_first_payment_is_served_first_until_its_authorization_or_deadline() -> None:
    case = Case()
    step = _decide(case, route=SERVE_FIRST)
    assert isinstance(step, ServeFirst)
    auth = case.payload.authorization
    assert step.due == min(auth.valid_before, case.payload.terms.deadline) and step.now == NOW


def test_a_new_payment_someone_else_deposited_is_adopted_then_served() -> None:
    case = Case()
    held = ChainFacts(now=NOW, state=State.HELD)
    step = _decide(case, chain=held)
    assert isinstance(step, Adopt) and step.accepted_at == NOW
    # Recorded as held, then decided again with the row: served, no deposit of its own.
    row = case.row(status="held", accepted_at=step.accepted_at)
    again = _decide(case, row=row, chain=held)
    assert isinstance(again, Serve) and again.deposit_tx is None and not again.serve_first


def test_a_deposit_of_someone_else_is_judged_at_a_time_its_deadline_was_valid() -> None:
    """Deposited long ago by the buyer: at today's clock its deadline is too near to accept, but it is Held."""
    case = Case(ttl=100)
    later = ChainFacts(now=NOW + 95, state=State.HELD)
    step = _decide(case, chain=later)
    assert isinstance(step, Adopt)
    assert step.accepted_at == case.payload.terms.deadline - RULES.min_time_left - 1
    # ... and then refused: too late to deliver, the escrow is the buyer's to refund.
    again = _decide(case, row=case.row(status="held", accepted_at=step.accepted_at), chain=later)
    assert _rejected(again) == Reason.ESCROW_REFUNDABLE


@pytest.mark.parametrize("state", [State.RELEASED, State.REFUNDED])
def test_a_new_payment_for_a_settled_escrow_is_rejected(state: State) -> None:
    assert _rejected(_decide(Case(), chain=ChainFacts(now=NOW, state=state))) == Reason.ESCROW_SETTLED


def test_a_new_payment_whose_deadline_is_too_near_is_rejected() -> None:
    assert _rejected(_decide(Case(ttl=5))) == Reason.DEADLINE_TOO_SOON


# -- a payment the store knows ---------------------------------------------------------------------


def test_an_answered_payment_is_replayed_and_needs_no_chain_facts() -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVED, response=RESPONSE, deposit_tx=TX)
    assert facts_needed(row) == Facts.NONE
    step = _decide(case, row=row, chain=ChainFacts())  # no clock: nothing was read
    assert isinstance(step, Replay) and step.row is row


def test_a_replay_is_verified_against_the_request_it_was_paid_for() -> None:
    """The same payment header sent to another URL is not a replay of that URL's answer."""
    case = Case()
    row = case.row(PaymentStatus.SERVED, response=RESPONSE)
    other = _offer(url="http://127.0.0.1:8000/report/8")
    assert _rejected(_decide(case, row=row, offer=other)) == Reason.REQUEST_HASH_MISMATCH


def test_a_replay_is_judged_at_the_price_it_was_accepted_at_after_a_dynamic_price_moved() -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVED, response=RESPONSE)
    dearer = case.offer.with_(amount=case.offer.amount * 2)
    assert isinstance(_decide(case, row=row, offer=dearer), Replay)


def test_a_replay_long_after_the_deadline_is_still_a_replay() -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVED, response=RESPONSE)
    assert isinstance(_decide(case, row=row, chain=ChainFacts(now=NOW + 10_000)), Replay)


def test_a_deposit_in_flight_from_an_earlier_request_or_another_replica_is_waited_for_not_sent_again() -> None:
    case = Case()
    row = case.row(PaymentStatus.DEPOSITING, deposit_tx=TX)
    assert facts_needed(row) == Facts.STATE
    step = _decide(case, row=row, chain=ChainFacts(now=NOW + 3, state=State.NONE))
    assert isinstance(step, ResumeDeposit) and step.tx_hash == TX


def test_a_recorded_payment_whose_deposit_never_left_is_deposited_under_todays_rules() -> None:
    case = Case()
    row = case.row(PaymentStatus.DEPOSITING)
    step = _decide(case, row=row, chain=ChainFacts(now=NOW + 3, state=State.NONE))
    assert isinstance(step, Deposit) and step.accepted_at is None  # recorded already: not recorded again
    # ... and under today's clock the deadline may no longer leave time: refused then.
    late = _decide(case, row=row, chain=ChainFacts(now=NOW + 95, state=State.NONE))
    assert _rejected(late) == Reason.DEADLINE_TOO_SOON


def test_crash_recovery_serves_a_held_payment_that_was_never_answered() -> None:
    case = Case()
    row = case.row(PaymentStatus.DEPOSITING, deposit_tx=TX)
    step = _decide(case, row=row, chain=ChainFacts(now=NOW + 20, state=State.HELD))
    assert isinstance(step, Serve) and step.deposit_tx == TX and not step.serve_first


def test_crash_recovery_too_near_the_deadline_refuses_to_serve() -> None:
    case = Case()
    row = case.row(PaymentStatus.DEPOSITING, deposit_tx=TX)
    assert _rejected(_decide(case, row=row, chain=ChainFacts(now=NOW + 95, state=State.HELD))) == (
        Reason.ESCROW_REFUNDABLE
    )


def test_a_recorded_payment_whose_escrow_was_settled_meanwhile_is_rejected() -> None:
    case = Case()
    step = _decide(
        case, row=case.row(PaymentStatus.DEPOSITING, deposit_tx=TX), chain=ChainFacts(now=NOW, state=State.REFUNDED)
    )
    assert _rejected(step) == Reason.ESCROW_SETTLED


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (ChainFacts(now=NOW + 5), None),  # unused, time left: served now
        (ChainFacts(now=NOW + 5, authorization_used=True), Reason.AUTHORIZATION_USED),
        (ChainFacts(now=NOW + 95), Reason.AUTHORIZATION_EXPIRED),  # no time left to settle it
    ],
)
def test_a_serve_first_payment_recorded_and_never_answered(chain: ChainFacts, expected: Reason | None) -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVING_FIRST)
    assert facts_needed(row) == Facts.AUTHORIZATION
    step = _decide(case, row=row, chain=chain, route=SERVE_FIRST)
    if expected is None:
        assert isinstance(step, Serve) and step.serve_first
    else:
        assert _rejected(step) == expected


# -- serve-first exposure, deposits that fail ------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "route", "expected"),
    [
        (Reserve.DONE, SERVE_FIRST, Serve),
        (Reserve.LIMIT, SERVE_FIRST, Deposit),  # over a limit: falls back to hold
        (Reserve.LIMIT, SERVE_FIRST_ONLY, Reason.SERVE_FIRST_LIMIT),
        (Reserve.REFUSED, SERVE_FIRST, Deposit),
        (Reserve.REFUSED, SERVE_FIRST_ONLY, Reason.SERVE_FIRST_REFUSED),
        (Reserve.KNOWN, SERVE_FIRST, Reason.PAYMENT_IN_PROGRESS),
    ],
)
def test_serve_first_within_and_over_the_exposure_limits(outcome: Reserve, route: Route, expected: object) -> None:
    case = Case()
    first = _decide(case, route=route)
    assert isinstance(first, ServeFirst)
    step = after_reserve(first, outcome, route, per_buyer=30_000, total=100_000)
    if isinstance(expected, type):
        assert isinstance(step, expected)
        if isinstance(step, Serve):
            assert step.serve_first
        if isinstance(step, Deposit):  # a new hold payment: recorded at the chain time it was verified at
            assert step.accepted_at == NOW and step.envelope is case.parsed.envelope
    elif expected == Reason.PAYMENT_IN_PROGRESS:
        assert isinstance(step, Unavailable) and step.reason == expected and step.retry_after == 1
    else:
        assert _rejected(step) == expected
        assert "limit" in str(step.rejected) or "unpaid" in str(step.rejected)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fault", "state", "expected", "forget"),
    [
        (DepositFault.PENDING, None, Reason.DEPOSIT_PENDING, False),  # on its way: the row stays
        (DepositFault.REVERTED, State.NONE, Reason.DEPOSIT_FAILED, True),
        (DepositFault.REVERTED, State.HELD, Serve, False),  # another deposit of it landed first
        (DepositFault.UNKNOWN, State.HELD, Serve, False),  # a lost receipt: it landed
        (DepositFault.UNKNOWN, State.NONE, Reason.CHAIN_UNAVAILABLE, True),
        (DepositFault.UNFUNDED, None, Reason.OPERATOR_UNFUNDED, True),
        (DepositFault.NONCE, None, Reason.NONCE_CONFLICT, True),
    ],
)
def test_a_failed_deposit(fault: DepositFault, state: State | None, expected: object, forget: bool) -> None:
    case = Case()
    deposit = _decide(case)
    assert isinstance(deposit, Deposit)
    step = after_deposit_fault(deposit.verified, fault, state, message="boom", detail="Revert()", reprice_after=1.5)
    assert isinstance(step, Forget) == forget
    then = step.then if isinstance(step, Forget) else step
    if expected is Serve:
        assert isinstance(then, Serve) and then.deposit_tx is None
    elif isinstance(then, Reject):
        assert (then.rejected.reason, then.rejected.status, then.rejected.error) == (
            expected,
            402,
            f"{expected}: Revert()",
        )
    else:
        assert isinstance(then, Unavailable) and then.reason == expected
        if fault == DepositFault.PENDING:
            assert then.retry_after == 2  # reprice_after rounded up


# -- answers: PAYMENT-RESPONSE ---------------------------------------------------------------------


def test_a_failed_handler_is_refunded_in_hold_and_costs_nothing_in_serve_first() -> None:
    case = Case()
    terms, escrow_id = case.payload.terms, case.escrow_id
    refunded = handler_failed(escrow_id, terms, TX, b"\x0e" * 32, serve_first=False)
    assert refunded.error == Reason.HANDLER_FAILED_REFUNDED and refunded.tx == TX
    assert refunded.extra.state == State.REFUNDED and refunded.extra.refund_transaction == b"\x0e" * 32
    pending = handler_failed(escrow_id, terms, TX, None, serve_first=False)
    assert pending.extra.state == State.HELD  # the poster or the keeper refunds it later
    free = handler_failed(escrow_id, terms, None, None, serve_first=True)
    assert free.error == Reason.HANDLER_FAILED_NOT_CHARGED and free.tx is None and free.extra.state is None


def test_a_kept_response_is_hashed_once_for_the_store_and_the_answer() -> None:
    case = Case()
    step = _decide(case)
    assert isinstance(step, Deposit)
    keep = kept(step.verified, RESPONSE.body, TX, serve_first=False)
    assert keep.delivery_hash == delivery_hash(RESPONSE.body) == keep.answer.extra.delivery_hash
    settle = decode_payment_response(keep.answer.header(case.payload.terms.buyer, "eip155:84532"))
    assert settle.success and settle.transaction == "0x" + TX.hex() and settle.payer == case.payload.terms.buyer


def test_a_served_answer_names_the_hash_and_its_settlement_mode() -> None:
    case = Case()
    hold = served(case.escrow_id, case.payload.terms, b"\x11" * 32, TX, serve_first=False)
    assert (hold.extra.settlement, hold.extra.state, hold.tx) == (SettlementStatus.HELD, State.HELD, TX)
    first = served(case.escrow_id, case.payload.terms, b"\x11" * 32, None, serve_first=True)
    assert (first.extra.settlement, first.tx, first.error) == (SettlementStatus.PENDING, None, None)
    assert first.extra.delivery_hash == b"\x11" * 32


@pytest.mark.parametrize(
    ("delivery", "onchain", "state"),
    [
        (None, None, State.HELD),
        (DeliveryRecord(DeliveryStatus.POSTED, b"\x11" * 32, TX), None, State.RELEASED),
        (DeliveryRecord(DeliveryStatus.EXPIRED, b"\x11" * 32, None), State.REFUNDED, State.REFUNDED),
        (DeliveryRecord(DeliveryStatus.EXPIRED, b"\x11" * 32, None), None, State.HELD),  # the chain did not answer
    ],
)
def test_a_hold_replay_says_where_its_delivery_stands(
    delivery: DeliveryRecord | None, onchain: State | None, state: State
) -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVED, response=RESPONSE, deposit_tx=TX)
    assert needs_chain_state_for_replay(row, delivery) == (
        delivery is not None and delivery.status == DeliveryStatus.EXPIRED
    )
    answer = replayed(row, delivery=delivery, onchain=onchain)
    assert answer.extra.state == state and answer.tx == TX and answer.error is None
    assert answer.extra.delivery_hash == delivery_hash(RESPONSE.body)  # the stored bytes' hash, recomputed


@pytest.mark.parametrize(
    ("status", "state"), [(PaymentStatus.REFUNDED, State.REFUNDED), (PaymentStatus.REFUND_PENDING, State.HELD)]
)
def test_a_refunded_replay_says_so(status: str, state: State) -> None:
    case = Case()
    row = case.row(status, response=StoredResponse(500, [], b"no"), deposit_tx=TX, refund_tx=b"\x0e" * 32)
    answer = replayed(row)
    assert answer.error == Reason.HANDLER_FAILED_REFUNDED and answer.extra.state == state


@pytest.mark.parametrize(
    ("record", "settlement", "error"),
    [
        (None, SettlementStatus.PENDING, None),
        (SettlementRecord(SettleStatus.QUEUED, 1, "b", b"\x11" * 32, None, None), SettlementStatus.PENDING, None),
        (SettlementRecord(SettleStatus.SETTLED, 1, "b", b"\x11" * 32, TX, None), SettlementStatus.SETTLED, None),
        (SettlementRecord(SettleStatus.LOST, 1, "b", b"\x11" * 32, None, "x"), None, Reason.SETTLEMENT_FAILED),
    ],
)
def test_a_serve_first_replay_says_where_its_settlement_stands(
    record: SettlementRecord | None, settlement: SettlementStatus | None, error: Reason | None
) -> None:
    case = Case()
    row = case.row(PaymentStatus.SERVED_FIRST, response=RESPONSE)
    answer = replayed(row, settlement=record)
    assert (answer.extra.settlement, answer.error) == (settlement, error)
    assert answer.tx == (TX if settlement == SettlementStatus.SETTLED else None)


def test_the_machine_is_pure_the_same_inputs_give_the_same_step() -> None:
    case = Case()
    facts = ChainFacts(now=NOW, state=State.NONE)
    assert _decide(case, chain=facts) == _decide(case, chain=facts)
    assert isinstance(case.parsed, ParsedPayment)
