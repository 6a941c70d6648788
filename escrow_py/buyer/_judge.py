"""Step 5, judge: what the answer to a paid (or replayed) request means for the payment. Pure.

    answer = read_answer(response, payment.escrow_id, replay=False)   # the answer, read once
    facts = ...the chain facts answer.needs names (PaymentCore.chain_facts)...
    verdict = judge(answer, payment, facts)                          # no I/O: a value
    PaymentCore.apply(verdict)                                       # the journal once, then raise

Once a delivery is posted, the chain is the judge, not the answer's header: a replay, or an answer
whose seller says the delivery is posted, is checked against the Delivered event's hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import httpx
from x402.schemas import SettleResponse

from escrow_py.buyer._errors import (
    DeliveryMismatch,
    HandlerFailedRefunded,
    PaymentError,
    PaymentNotDelivered,
    PaymentRejected,
)
from escrow_py.buyer._journal import PaymentState
from escrow_py.protocol.errors import ChainError, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms, delivery_hash
from escrow_py.protocol.wire import (
    DEPOSIT_MAY_BE_PENDING,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    SettlementExtra,
    SettlementStatus,
    Unavailable,
    decode_payment_required,
    decode_payment_response,
)


class Payment(Protocol):
    """What the judge knows of the payment an answer is for (a Prepared payment, a JournalEntry)."""

    @property
    def escrow_id(self) -> bytes: ...
    @property
    def terms(self) -> Terms: ...
    @property
    def escrow(self) -> str: ...
    @property
    def valid_before(self) -> int: ...


class Need(Enum):
    """The chain fact a judgement needs."""

    NOTHING = "nothing"
    STATE = "state"  # the escrow's state
    POSTED_HASH = "posted_hash"  # the hash of the Delivered event (the state first, without a delivery tx)


class Kind(Enum):
    """What the seller answered, as far as the answer itself says."""

    NO_RECEIPT = "no PAYMENT-RESPONSE"  # refused, unavailable, or a failure without a receipt
    UNREADABLE = "unreadable PAYMENT-RESPONSE"
    OTHER_ESCROW = "a PAYMENT-RESPONSE for another escrow"
    NOT_CHARGED = "served first, the handler failed, nothing sent to the chain"
    HANDLER_FAILED = "the handler failed"
    DELIVERY = "a delivery, judged by its header's hash"
    POSTED_DELIVERY = "a posted delivery, judged by the chain's hash"

    @property
    def needs(self) -> Need:
        if self in (Kind.NO_RECEIPT, Kind.HANDLER_FAILED):
            return Need.STATE
        return Need.POSTED_HASH if self is Kind.POSTED_DELIVERY else Need.NOTHING


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to a paid request, read once: its status, its body's hash and its receipt."""

    kind: Kind
    status: int
    received: bytes  # keccak256 of the body
    unavailable: Unavailable | None = None
    refusal: str | None = None  # the 402's error, for an answer without a receipt
    problem: str | None = None  # why PAYMENT-RESPONSE could not be read
    settle: SettleResponse | None = None
    extra: SettlementExtra | None = None

    @property
    def needs(self) -> Need:
        return self.kind.needs


@dataclass(frozen=True, slots=True)
class ChainFacts:
    """What the chain said, as far as the judgement needed to ask (Answer.needs); a read that failed is kept."""

    state: State | None = None
    state_error: ChainError | None = None
    posted_hash: bytes | None = None
    hash_error: ChainError | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to write to the journal (`state` None: nothing) and the error to raise (None: a verified delivery)."""

    state: PaymentState | None
    detail: str | None = None
    response_hash: bytes | None = None
    committed_hash: bytes | None = None
    tx_hash: bytes | None = None
    error: PaymentError | None = None


def read_answer(response: httpx.Response, escrow_id: bytes, *, replay: bool) -> Answer:
    """Read the answer to the paid (or, `replay`, replayed) request for `escrow_id`."""
    status, received = response.status_code, delivery_hash(response.content)
    value = response.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is None:
        unavailable = Unavailable.decode(status, response.headers, response.content)
        refusal = None if unavailable is not None else _refusal_reason(response)
        return Answer(Kind.NO_RECEIPT, status, received, unavailable=unavailable, refusal=refusal)
    try:
        settle = decode_payment_response(value)
        extra = SettlementExtra.from_json(settle.extra)
    except ProtocolError as exc:
        return Answer(Kind.UNREADABLE, status, received, problem=str(exc))
    if extra.escrow_id != escrow_id:
        kind = Kind.OTHER_ESCROW
    elif settle.error_reason == Reason.HANDLER_FAILED_NOT_CHARGED and status >= 400:
        kind = Kind.NOT_CHARGED
    elif status >= 400 or settle.error_reason == Reason.HANDLER_FAILED_REFUNDED:
        kind = Kind.HANDLER_FAILED
    else:
        posted = replay or extra.delivery_transaction is not None or extra.state is State.RELEASED
        # A served-first payment never had an escrow, so no Delivered event holds its hash; and a header
        # hash the bytes already miss is a mismatch whatever the chain says.
        to_chain = posted and not _served_first(settle, extra) and extra.delivery_hash == received
        kind = Kind.POSTED_DELIVERY if to_chain else Kind.DELIVERY
    return Answer(kind, status, received, settle=settle, extra=extra)


def judge(answer: Answer, payment: Payment, facts: ChainFacts) -> Verdict:
    """The verdict on `answer` to `payment`, given the chain facts `answer.needs`."""
    eid, deadline, escrow = payment.escrow_id, payment.terms.deadline, payment.escrow
    if answer.kind is Kind.NO_RECEIPT:
        return _no_receipt(answer, payment, facts)
    if answer.kind is Kind.UNREADABLE:
        problem = answer.problem
        error = PaymentNotDelivered(eid, deadline, f"unreadable PAYMENT-RESPONSE ({problem})", escrow=escrow)
        return Verdict(PaymentState.HELD, f"unreadable PAYMENT-RESPONSE: {problem}", error=error)
    settle, extra = answer.settle, answer.extra
    assert settle is not None and extra is not None  # every other kind carries its receipt
    if answer.kind is Kind.OTHER_ESCROW:
        named = f"PAYMENT-RESPONSE names escrow 0x{extra.escrow_id.hex()} instead"
        error = PaymentNotDelivered(eid, deadline, named, escrow=escrow)
        return Verdict(PaymentState.HELD, "PAYMENT-RESPONSE names another escrow", error=error)
    if answer.kind is Kind.NOT_CHARGED:
        # Served first and the handler failed: the seller sent nothing to the chain. The authorization
        # stays valid until validBefore; recover() voids it then, unless the chain shows it used.
        rejected = PaymentRejected(eid, settle.error_reason, answer.status, payment.valid_before)
        return Verdict(PaymentState.REJECTED, f"{answer.status} {settle.error_reason}", error=rejected)
    if answer.kind is Kind.HANDLER_FAILED:
        return _handler_failed(answer, payment, facts, settle, extra)
    return _delivered(answer, payment, facts, settle, extra)


def _handler_failed(
    answer: Answer, payment: Payment, facts: ChainFacts, settle: SettleResponse, extra: SettlementExtra
) -> Verdict:
    """The handler failed: refunded if the chain says so, else still held."""
    eid, deadline, escrow = payment.escrow_id, payment.terms.deadline, payment.escrow
    if facts.state_error is not None:
        return _state_unknown(payment, f"the handler failed with {answer.status}", facts.state_error)
    if facts.state is State.REFUNDED:
        refunded = HandlerFailedRefunded(eid, extra.refund_transaction, answer.status)
        return Verdict(PaymentState.REFUNDED, settle.error_reason, tx_hash=extra.refund_transaction, error=refunded)
    still = _state_name(facts.state)
    held = f"the handler failed with {answer.status} and the escrow is still {still}"
    return Verdict(
        PaymentState.HELD, settle.error_reason, error=PaymentNotDelivered(eid, deadline, held, escrow=escrow)
    )


def _no_receipt(answer: Answer, payment: Payment, facts: ChainFacts) -> Verdict:
    """No receipt: the chain says whether the payment was refused, may still be deposited, or is held."""
    eid, deadline, escrow, status = payment.escrow_id, payment.terms.deadline, payment.escrow, answer.status
    unavailable = answer.unavailable
    reason = unavailable.reason.value if unavailable is not None else answer.refusal
    if facts.state_error is not None:
        return _state_unknown(payment, f"the seller answered {status} ({reason})", facts.state_error)
    state = facts.state
    if state is State.NONE and unavailable is not None and unavailable.reason in DEPOSIT_MAY_BE_PENDING:
        # Not deposited when checked, but the seller may have sent the deposit: it can still land.
        detail = (
            f"the seller answered {status} ({reason}: {unavailable.message}) and the escrow was not deposited "
            f"when checked; a deposit the seller sent may still land before {payment.valid_before}"
        )
        error = PaymentNotDelivered(eid, deadline, detail, escrow=escrow)
        return Verdict(PaymentState.SIGNED, f"{status} {reason}: a deposit may be pending", error=error)
    if state is State.NONE:
        rejected = PaymentRejected(eid, reason, status, payment.valid_before)
        return Verdict(PaymentState.REJECTED, f"{status} {reason}", error=rejected)
    if state is State.REFUNDED:
        return Verdict(PaymentState.REFUNDED, f"{status} {reason}", error=HandlerFailedRefunded(eid, None, status))
    held = f"the seller answered {status} ({reason}), escrow is {_state_name(state)}"
    return Verdict(
        PaymentState.HELD, f"{status} {reason}", error=PaymentNotDelivered(eid, deadline, held, escrow=escrow)
    )


def _delivered(
    answer: Answer, payment: Payment, facts: ChainFacts, settle: SettleResponse, extra: SettlementExtra
) -> Verdict:
    """An answer with the bytes: delivered if they match the committed hash (the chain's, once posted),
    unsettled if they were served first, a mismatch otherwise."""
    eid, received, committed = payment.escrow_id, answer.received, extra.delivery_hash
    if answer.kind is Kind.POSTED_DELIVERY:
        if facts.state_error is not None:
            return _state_unknown(payment, "a replayed delivery", facts.state_error)
        if facts.hash_error is not None:
            unread = f"the delivery's on-chain hash could not be read ({facts.hash_error})"
            error = _caused(PaymentNotDelivered(eid, extra.deadline, unread, escrow=payment.escrow), facts.hash_error)
            return Verdict(None, error=error)
        committed = facts.posted_hash or committed  # None while the escrow is still Held: the header's
    if committed != received:
        mismatch = DeliveryMismatch(eid, committed, received)
        return Verdict(PaymentState.MISMATCH, response_hash=received, committed_hash=committed, error=mismatch)
    if _served_first(settle, extra):
        # Served first: the bytes are here and match the seller's hash, the money has not moved (or the
        # seller says it has). Only the chain closes it (recover(): Settled event, or validBefore passed).
        detail = f"served first; settlement {extra.settlement or settle.error_reason}"
        return Verdict(PaymentState.UNSETTLED, detail, response_hash=received, committed_hash=committed)
    return Verdict(PaymentState.DELIVERED, response_hash=received, committed_hash=committed)


def _state_unknown(payment: Payment, answer: str, exc: ChainError) -> Verdict:
    """The signed payment has left the process: a chain failure now must still say where the money is."""
    detail = (
        f"{answer}, and the escrow's state could not be read ({exc}); the money stays in the buyer's wallet "
        f"unless the signed authorization is deposited before {payment.valid_before}"
    )
    error = PaymentNotDelivered(payment.escrow_id, payment.terms.deadline, detail, escrow=payment.escrow)
    return Verdict(None, error=_caused(error, exc))


def _caused(error: PaymentError, cause: BaseException) -> PaymentError:
    error.__cause__ = cause
    return error


def _state_name(state: State | None) -> str:
    return "unknown" if state is None else state.name


def _served_first(settle: SettleResponse, extra: SettlementExtra) -> bool:
    served_first = extra.settlement in (SettlementStatus.PENDING, SettlementStatus.SETTLED)
    return served_first or settle.error_reason == Reason.SETTLEMENT_FAILED


def _refusal_reason(response: httpx.Response) -> str | None:
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is None:
        return None
    try:
        return decode_payment_required(value).error
    except ProtocolError:
        return None
