"""The seller's payment state machine: pure and synchronous, no I/O.

A paid request is decided here and carried out by the ASGI adapter (`_middleware.py`), in the
keeper's fetch -> decide -> act shape:

    parsed = parse_payment(header, ...)            the header, decoded once
    step = decide(parsed, offer, route, row, chain, rules)
    ... the adapter acts on `step` (a deposit, the handler, a store write), and hands the outcome
        back to one of the functions below for the step after it ...

Every function takes plain values (the parsed payment, the offer computed for this request,
the store's row, the chain facts the adapter read) and returns a step or an answer; none of
them reads the chain, the store or the clock. The steps:

    Reject         the buyer's fault: 400/402 with the reason and a fresh offer
    Unavailable    the seller's side cannot take it now: 503 with Retry-After
    Replay         a stored response, sent again byte for byte
    Deposit        verified: check on chain, record (unless recorded), deposit, then serve
    ResumeDeposit  a deposit sent by an earlier request: wait for it rather than send another
    Adopt          deposited by someone else and never answered here: record it, then serve
    ServeFirst     verified for serve-first: check on chain, reserve exposure, serve unsettled
    Serve          run the handler under a confirmed escrow (hold) or a reservation (serve-first)

The seller's hooks, offer building (`_offers.py`) and the chain's and store's own rules stay where
they are; this module only says which of them comes next.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from x402.schemas import PaymentPayload, SettleResponse

from escrow_py.protocol.errors import EscrowError, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms, delivery_hash
from escrow_py.protocol.wire import (
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    SettlementStatus,
    decode_payment_signature,
    encode_payment_response,
)
from escrow_py.protocol.wire import Unavailable as UnavailableBody
from escrow_py.seller._store import (
    DeliveryRecord,
    DeliveryStatus,
    Payment,
    PaymentStatus,
    Reserve,
    SettlementRecord,
    SettleStatus,
)
from escrow_py.seller._verify import Refusal, VerifiedPayment, verify_offchain

EXACT = "exact"  # the x402 SDK's own scheme: settled by the SDK's facilitator, not by this machine

# PAYMENT-RESPONSE `state` of a served payment by its delivery's status: what the chain says as far as
# the seller knows (pending and expired deliveries leave the escrow Held).
_DELIVERY_STATE = {
    DeliveryStatus.POSTED: State.RELEASED,
    DeliveryStatus.SETTLED_ELSEWHERE: State.RELEASED,
    DeliveryStatus.REFUNDED_ON_CHAIN: State.REFUNDED,
}


# -- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedPayment:
    """PAYMENT-SIGNATURE decoded once, for the whole request.

    `envelope` is the x402 envelope (None: the header does not decode); for a delivery-escrow
    payment `payload` is its decoded payload and `escrow_id` the id its terms name (not yet
    verified: the claim is taken on it, then everything is checked). `rejected` says why a
    delivery-escrow header cannot be taken at all.
    """

    envelope: PaymentPayload | None
    payload: EscrowPayload | None
    escrow_id: bytes | None
    rejected: Refusal | None
    exact: bool = False  # a payment in the SDK's `exact` scheme (it goes to _offers.Offers.pay_exact)


def parse_payment(header: str, *, chain_id: int, escrow: str) -> ParsedPayment:
    """Decode PAYMENT-SIGNATURE and, unless it is `exact`, its delivery-escrow payload and escrow id."""
    try:
        envelope = decode_payment_signature(header)
    except ProtocolError as exc:
        return ParsedPayment(None, None, None, Refusal(exc.reason, str(exc)))
    if envelope.accepted.scheme == EXACT:
        return ParsedPayment(envelope, None, None, None, exact=True)
    try:
        payload = EscrowPayload.from_json(envelope.payload)
    except ProtocolError as exc:
        return ParsedPayment(envelope, None, None, Refusal(exc.reason, str(exc)))
    return ParsedPayment(envelope, payload, payload.terms.escrow_id(chain_id, escrow), None)


@dataclass(frozen=True, slots=True)
class Rules:
    """The seller's time rules (SellerConfig): seconds a deadline must leave, and slack past maxTimeout."""

    min_time_left: int
    deadline_slack: int


class RouteMode(Protocol):
    """What the machine needs of the priced route (a PricedRoute is one): its settlement mode, and whether
    serve-first may fall back to hold past an exposure limit."""

    @property
    def serve_first(self) -> bool: ...

    @property
    def fallback_to_hold(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Route:
    """A RouteMode as a plain value."""

    serve_first: bool = False
    fallback_to_hold: bool = False


class Facts(StrEnum):
    """Which chain facts a decision needs, given the store's row (`facts_needed`)."""

    NONE = "none"  # answered: the stored response is replayed as it is
    STATE = "state"  # the escrow's state and the chain's clock
    AUTHORIZATION = "authorization"  # an unanswered serve-first: its authorization's state and the clock


@dataclass(frozen=True, slots=True)
class ChainFacts:
    """What the adapter read from the chain for one decision (a plain value: any chain port can fill it)."""

    now: int = 0  # the next block's timestamp: the clock a transaction sent now meets
    state: State = State.NONE
    authorization_used: bool = False


def facts_needed(row: Payment | None) -> Facts:
    if row is not None and (row.response is not None or row.declined is not None):
        return Facts.NONE
    if row is not None and row.serve_first:
        return Facts.AUTHORIZATION
    return Facts.STATE


# -- steps -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reject:
    rejected: Refusal


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: Reason
    public: str  # the message the client sees: never an exception's text (it can carry the RPC URL)
    retry_after: int


class SellerUnavailable(EscrowError):
    """The seller's own side cannot take the payment now (503 with Retry-After); the buyer is not at fault.
    The adapter raises it for an Unavailable step, a claim it cannot take and a hook that raised.

    `reason` is a wire.Reason, `public` the message the client sees (never an exception's
    text: those can carry the RPC URL and its API key).
    """

    def __init__(self, reason: Reason, public: str, retry_after: int) -> None:
        super().__init__(f"{reason}: {public}")
        self.reason = reason
        self.public = public
        self.retry_after = retry_after

    def wire(self) -> UnavailableBody:
        """The 503's body and Retry-After (_asgi.send_unavailable sends it)."""
        return UnavailableBody(self.reason, self.public, self.retry_after)


@dataclass(frozen=True, slots=True)
class Replay:
    row: Payment


@dataclass(frozen=True, slots=True)
class Deposit:
    verified: VerifiedPayment
    accepted_at: int | None  # the chain time it was accepted at; None: the row exists, only deposit it
    # The x402 envelope, for the seller's hooks (they run around a new payment's verify and deposit).
    envelope: PaymentPayload | None = None
    # The signed payload as the store keeps it (JSON text): what a reorg's re-deposit sends again.
    record: str = ""


@dataclass(frozen=True, slots=True)
class ResumeDeposit:
    verified: VerifiedPayment
    tx_hash: bytes


@dataclass(frozen=True, slots=True)
class Adopt:
    verified: VerifiedPayment
    accepted_at: int  # a chain time at which its deadline and authorization were both valid

    def row(self, status: PaymentStatus) -> tuple[str, Payment]:
        """(the payload as the store keeps it, the row recorded in `status`) of the adopted payment."""
        verified, record = self.verified, _payload_json(self.verified)
        terms = verified.payload.terms
        return record, Payment(verified.escrow_id, terms, status, self.accepted_at, None, None, None, record)


@dataclass(frozen=True, slots=True)
class ServeFirst:
    verified: VerifiedPayment
    now: int
    due: int  # the chain time by which its settlement must land: min(validBefore, deadline)
    envelope: PaymentPayload | None = None  # for the seller's hooks
    record: str = ""  # the buyer's x402 envelope as the store keeps it (JSON text): see envelope_json


@dataclass(frozen=True, slots=True)
class Serve:
    verified: VerifiedPayment
    deposit_tx: bytes | None = None
    serve_first: bool = False


Step = Reject | Unavailable | Replay | Deposit | ResumeDeposit | Adopt | ServeFirst | Serve

IN_PROGRESS = Unavailable(Reason.PAYMENT_IN_PROGRESS, "this payment is being processed; send it again", 1)


# -- deciding --------------------------------------------------------------------------------------


def decide(
    parsed: ParsedPayment,
    offer: EscrowRequirements,
    *,
    route: RouteMode,
    row: Payment | None,
    chain: ChainFacts,
    rules: Rules,
) -> Step:
    """The next step for a delivery-escrow payment, given the store's row and the chain facts.

    A recorded payment is verified again as it was when accepted (same request, terms and
    signature; the price and payTo of then, since a dynamic price may have moved).
    """
    try:
        if parsed.rejected is not None:
            return Reject(parsed.rejected)
        if row is not None:
            return _recorded(parsed, _as_accepted(offer, row.terms), row, chain, rules)
        return _first_time(parsed, offer, route, chain, rules)
    except Refusal as rejected:
        return Reject(rejected)


def _verify(parsed: ParsedPayment, offer: EscrowRequirements, at: int, rules: Rules) -> VerifiedPayment:
    assert parsed.envelope is not None and parsed.payload is not None  # parse_payment rejected it otherwise
    return verify_offchain(
        parsed.envelope,
        offer,
        chain_time=at,
        min_time_left=rules.min_time_left,
        deadline_slack=rules.deadline_slack,
        payload=parsed.payload,
    )


def _recorded(parsed: ParsedPayment, offer: EscrowRequirements, row: Payment, chain: ChainFacts, rules: Rules) -> Step:
    verified = _verify(parsed, offer, row.accepted_at, rules)
    if row.response is not None:
        return Replay(row)
    if row.declined is not None:
        raise declined(row)
    if row.serve_first:
        # Recorded and never answered (the seller died mid-handler): served now if its authorization
        # is still unused and leaves the poster time to settle it.
        if chain.authorization_used:
            raise Refusal(Reason.AUTHORIZATION_USED, "the authorization was already used or cancelled")
        due = settle_due(verified)
        if chain.now + rules.min_time_left > due:
            raise Refusal(
                Reason.AUTHORIZATION_EXPIRED,
                f"validBefore/deadline {due} leaves no time to settle (chain time {chain.now})",
            )
        return Serve(verified, serve_first=True)
    if chain.state == State.NONE:
        if row.status == PaymentStatus.DEPOSITING and row.deposit_tx is not None:
            # Sent earlier and not confirmed then (503 deposit_pending): wait for that one, don't send another.
            return ResumeDeposit(verified, row.deposit_tx)
        # Recorded, but the deposit never landed: try it again under today's rules.
        return Deposit(_verify(parsed, offer, chain.now, rules), accepted_at=None)
    if chain.state == State.HELD:
        _require_time_left(verified.terms, chain.now, rules)  # a crash mid-handler: serve it now
        return Serve(verified, row.deposit_tx)
    raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{verified.escrow_id.hex()} is {chain.state.name}")


def declined(row: Payment) -> Refusal:
    """The refusal of a payment the seller's before-settle hook declined after its handler ran: answered as it was
    then (402 with the hook's reason), never served and never charged."""
    reason = row.declined or PaymentStatus.DECLINED
    return Refusal(reason, f"the seller declined to settle payment 0x{row.escrow_id.hex()}: {reason}")


def _first_time(
    parsed: ParsedPayment, offer: EscrowRequirements, route: RouteMode, chain: ChainFacts, rules: Rules
) -> Step:
    if chain.state == State.NONE:
        verified = _verify(parsed, offer, chain.now, rules)
        if route.serve_first:
            return ServeFirst(verified, chain.now, settle_due(verified), parsed.envelope, envelope_json(parsed))
        return Deposit(verified, accepted_at=chain.now, envelope=parsed.envelope, record=_payload_json(verified))
    if chain.state == State.HELD:
        # Deposited by someone else (the buyer, another replica) and never answered here. The token
        # checked the signature on deposit; judge the rest at a time the deadline was valid.
        assert parsed.payload is not None
        terms, auth = parsed.payload.terms, parsed.payload.authorization
        latest_valid = min(terms.deadline, auth.valid_before) - rules.min_time_left - 1
        reference = min(chain.now, latest_valid)
        return Adopt(_verify(parsed, offer, reference, rules), reference)
    raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{parsed.escrow_id.hex() if parsed.escrow_id else ''} "
                          f"is {chain.state.name}")  # fmt: skip


def _require_time_left(terms: Terms, now: int, rules: Rules) -> None:
    if now + rules.min_time_left > terms.deadline:
        raise Refusal(
            Reason.ESCROW_REFUNDABLE,
            f"deadline {terms.deadline} is less than {rules.min_time_left}s after chain time {now}: "
            "too late to deliver, the escrow is refundable",
        )


def _as_accepted(offer: EscrowRequirements, terms: Terms) -> EscrowRequirements:
    """The offer judged by the amount and payTo its stored payment was accepted at."""
    if (offer.amount, offer.pay_to) == (terms.amount, terms.seller):
        return offer
    return offer.with_(amount=terms.amount, pay_to=terms.seller)


def _payload_json(verified: VerifiedPayment) -> str:
    return json.dumps(verified.payload.to_json())


def envelope_json(parsed: ParsedPayment) -> str:
    """The buyer's whole x402 envelope as a serve-first record keeps it: the settlement needs its payload, and
    the seller's after-settle hooks (run later, by the settlement worker) its accepted requirements."""
    assert parsed.envelope is not None
    return parsed.envelope.model_dump_json(by_alias=True, exclude_none=True)


def stored_escrow_payload(text: str) -> EscrowPayload:
    """The signed EscrowPayload of a stored record: kept alone (hold, a facilitator's own settlements, serve-first
    records written before the envelope was kept) or inside the buyer's x402 envelope (serve-first)."""
    data = json.loads(text)
    if isinstance(data, dict) and "accepted" in data and isinstance(data.get("payload"), dict):
        data = data["payload"]
    return EscrowPayload.from_json(data)


def stored_envelope(text: str | None) -> PaymentPayload | None:
    """The x402 envelope of a stored serve-first record; None for a record that keeps the EscrowPayload alone."""
    if text is None:
        return None
    data = json.loads(text)
    if not (isinstance(data, dict) and "accepted" in data):
        return None
    return PaymentPayload.model_validate(data)


def settle_due(verified: VerifiedPayment) -> int:
    """The chain time by which a serve-first settlement must have landed."""
    return min(verified.payload.authorization.valid_before, verified.terms.deadline)


# -- after an action -------------------------------------------------------------------------------


def after_reserve(step: ServeFirst, outcome: Reserve, route: RouteMode, *, per_buyer: int, total: int) -> Step:
    """Serve first if the exposure was reserved; past a limit, fall back to hold (if the route may) or refuse."""
    if outcome == Reserve.DONE:
        return Serve(step.verified, serve_first=True)
    if outcome == Reserve.KNOWN:
        return IN_PROGRESS
    terms = step.verified.terms
    reason = Reason(outcome.value)
    why = (
        f"buyer {terms.buyer} left a serve-first settlement unpaid"
        if reason == Reason.SERVE_FIRST_REFUSED
        else f"serving {terms.amount} first would pass an exposure limit (per buyer {per_buyer}, total {total})"
    )
    if route.fallback_to_hold:
        # Its record is a hold one: the signed payload alone, what a reorg's re-deposit sends again.
        return Deposit(step.verified, accepted_at=step.now, envelope=step.envelope, record=_payload_json(step.verified))
    return Reject(Refusal(reason, why))


class DepositFault(StrEnum):
    """How sending a deposit failed (the adapter maps the chain's exceptions to these)."""

    PENDING = "pending"  # sent, not confirmed in time
    REVERTED = "reverted"  # mined and reverted
    UNFUNDED = "unfunded"  # the operator cannot pay gas
    NONCE = "nonce"  # the operator's nonce was taken twice
    UNKNOWN = "unknown"  # the node failed: whether it landed is unknown until the chain is asked


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop the payment's `depositing` row (nothing is on its way), then take `then`."""

    then: Reject | Unavailable


def state_needed(fault: DepositFault) -> bool:
    """Whether the escrow's state must be read to judge the fault (a revert or an unknown outcome)."""
    return fault in (DepositFault.REVERTED, DepositFault.UNKNOWN)


def after_deposit_fault(
    verified: VerifiedPayment,
    fault: DepositFault,
    state: State | None,
    *,
    message: str = "",
    detail: str | None = None,
    reprice_after: float = 1.0,
) -> Step | Forget:
    """The step after a failed deposit; `state` is the escrow's state read after it (state_needed).

    A revert is the buyer's payment failing at the token or the escrow (402 deposit_failed with
    the decoded revert as `detail`); the others are the seller's side (503 with a reason).
    """
    if fault == DepositFault.PENDING:
        return Unavailable(
            Reason.DEPOSIT_PENDING,
            "the deposit was sent and is not confirmed yet; send the same payment again",
            max(1, math.ceil(reprice_after)),
        )
    if fault == DepositFault.UNFUNDED:
        return Forget(Unavailable(Reason.OPERATOR_UNFUNDED, "the seller cannot pay for gas now", 30))
    if fault == DepositFault.NONCE:
        return Forget(Unavailable(Reason.NONCE_CONFLICT, "the seller's transaction key is busy", 1))
    if state == State.HELD:
        # It landed although we saw an error (a lost receipt), or another deposit of it did meanwhile.
        return Serve(verified, None)
    if fault == DepositFault.REVERTED:
        return Forget(Reject(Refusal(Reason.DEPOSIT_FAILED, message, detail=detail)))
    return Forget(Unavailable(Reason.CHAIN_UNAVAILABLE, "the deposit could not be sent", CHAIN_RETRY_AFTER))


# Seconds a client should wait before sending the payment again after a 503 chain_unavailable.
CHAIN_RETRY_AFTER = 2


# -- answers (PAYMENT-RESPONSE's extra) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What PAYMENT-RESPONSE says: the extra, the transaction it names, and the error (None: success)."""

    extra: SettlementExtra
    tx: bytes | None = None
    error: Reason | None = None

    def settle_response(self, payer: str, network: str) -> SettleResponse:
        return SettleResponse(
            # A serve-first handler failure: nothing was charged, and nothing will be.
            success=self.error not in {Reason.HANDLER_FAILED_NOT_CHARGED, Reason.SETTLEMENT_FAILED},
            transaction="0x" + self.tx.hex() if self.tx else "",
            network=network,
            payer=payer,
            error_reason=self.error,
            extra=self.extra.to_json(),
        )

    def header(self, payer: str, network: str) -> str:
        """The PAYMENT-RESPONSE header's value."""
        return encode_payment_response(self.settle_response(payer, network))


@dataclass(frozen=True, slots=True)
class Kept:
    """A handler's response to keep: its delivery hash (to store and commit) and the answer that goes with it."""

    delivery_hash: bytes
    answer: Answer


def kept(verified: VerifiedPayment, body: bytes, deposit_tx: bytes | None, *, serve_first: bool) -> Kept:
    """A successful handler's response: hashed, and answered held (hold) or pending (serve-first)."""
    hashed = delivery_hash(body)
    return Kept(hashed, served(verified.escrow_id, verified.payload.terms, hashed, deposit_tx, serve_first=serve_first))


def served(escrow_id: bytes, terms: Terms, hashed: bytes, deposit_tx: bytes | None, *, serve_first: bool) -> Answer:
    if serve_first:
        extra = SettlementExtra(
            escrow_id=escrow_id, deadline=terms.deadline, delivery_hash=hashed, settlement=SettlementStatus.PENDING
        )
        return Answer(extra)
    extra = SettlementExtra(
        escrow_id=escrow_id,
        deadline=terms.deadline,
        delivery_hash=hashed,
        state=State.HELD,
        settlement=SettlementStatus.HELD,
    )
    return Answer(extra, deposit_tx)


def handler_failed(
    escrow_id: bytes,
    terms: Terms,
    deposit_tx: bytes | None,
    refund_tx: bytes | None,
    *,
    serve_first: bool,
    refunded: bool | None = None,
) -> Answer:
    """A handler that failed: serve-first charged nobody; hold refunded (or will be: the poster, the keeper).

    `refunded` says whether the refund went through (default: a refund transaction is known).
    """
    if serve_first:
        return Answer(SettlementExtra(escrow_id=escrow_id, deadline=terms.deadline), None,
                      Reason.HANDLER_FAILED_NOT_CHARGED)  # fmt: skip
    extra = SettlementExtra(
        escrow_id=escrow_id,
        deadline=terms.deadline,
        refund_transaction=refund_tx,
        state=State.REFUNDED if (refund_tx is not None if refunded is None else refunded) else State.HELD,
    )
    return Answer(extra, deposit_tx, Reason.HANDLER_FAILED_REFUNDED)


def needs_chain_state_for_replay(row: Payment, delivery: DeliveryRecord | None) -> bool:
    """A hold replay whose delivery expired: the escrow stays Held until the buyer's refund, so the chain is asked."""
    return not row.serve_first and delivery is not None and delivery.status == DeliveryStatus.EXPIRED


def replayed(
    row: Payment,
    *,
    delivery: DeliveryRecord | None = None,
    settlement: SettlementRecord | None = None,
    onchain: State | None = None,
) -> Answer:
    """The PAYMENT-RESPONSE of a stored response sent again: where its delivery or settlement stands."""
    terms, escrow_id = row.terms, row.escrow_id
    hashed = delivery_hash(row.response.body) if row.response is not None else None
    if row.serve_first:
        settled = settlement is not None and settlement.status == SettleStatus.SETTLED
        lost = settlement is not None and settlement.status == SettleStatus.LOST
        extra = SettlementExtra(
            escrow_id=escrow_id,
            deadline=terms.deadline,
            delivery_hash=hashed,
            settlement=None if lost else SettlementStatus.SETTLED if settled else SettlementStatus.PENDING,
        )
        tx = settlement.tx_hash if settlement is not None and settled else None
        return Answer(extra, tx, Reason.SETTLEMENT_FAILED if lost else None)
    if row.status in (PaymentStatus.REFUNDED, PaymentStatus.REFUND_PENDING):
        extra = SettlementExtra(
            escrow_id=escrow_id,
            deadline=terms.deadline,
            refund_transaction=row.refund_tx,
            state=State.REFUNDED if row.status == PaymentStatus.REFUNDED else State.HELD,
        )
        return Answer(extra, row.deposit_tx, Reason.HANDLER_FAILED_REFUNDED)
    state = _DELIVERY_STATE.get(delivery.status, State.HELD) if delivery is not None else State.HELD
    if delivery is not None and delivery.status == DeliveryStatus.EXPIRED:
        # Expired: Held until the buyer's refund, unless the chain (asked) says otherwise.
        state = onchain if onchain in (State.RELEASED, State.REFUNDED) else State.HELD
    extra = SettlementExtra(
        escrow_id=escrow_id,
        deadline=terms.deadline,
        delivery_hash=hashed,
        delivery_transaction=delivery.tx_hash if delivery else None,
        state=state,
        settlement=SettlementStatus.HELD,
    )
    return Answer(extra, row.deposit_tx)
