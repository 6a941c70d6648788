"""What the sync client, the async client and the httpx.Auth hook share: reading a 402,
building and signing the terms, journaling them, and judging the paid response.

Every step that talks to the chain or the disk is a plain blocking call; the async
flow runs those in a worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from eth_typing import ChecksumAddress
from web3 import HTTPProvider, Web3
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements

from escrow_py.buyer._errors import (
    DeliveryMismatch,
    HandlerFailedRefunded,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentRejected,
    PolicyDenied,
    RequestHashMismatch,
    ResponseInvalid,
)
from escrow_py.buyer._journal import Journal, PaymentState
from escrow_py.buyer._policy import Decision, PaymentContext, Policy, ReasonCode
from escrow_py.buyer._validate import TASK_EXTENSION, VALIDATOR_EXTENSION, Validator, problem_with
from escrow_py.chain import rpc
from escrow_py.chain.authorization import Authorization, TokenDomain, authorization_for, sign_authorization
from escrow_py.chain.escrow import Escrow
from escrow_py.chain.signer import Signer
from escrow_py.chain.token import Token
from escrow_py.errors import ProtocolError
from escrow_py.terms import MAX_DEADLINE_WINDOW, State, Terms, canonical_url, delivery_hash, request_hash
from escrow_py.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SCHEME,
    X402_VERSION,
    EscrowPayload,
    EscrowRequirements,
    Reason,
    SettlementExtra,
    decode_payment_required,
    decode_payment_response,
    encode_payment_signature,
)

# Headers never written to the journal: credentials, and those httpx recomputes on replay.
_UNJOURNALED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        PAYMENT_SIGNATURE_HEADER.lower(),
    }
)


@runtime_checkable
class PaymentPolicy(Protocol):
    """A custom rule, asked before anything is signed (after the declarative Policy's offer rules and before
    its budgets); raise PolicyDenied (or any PaymentRefused) to deny."""

    def check(self, request: httpx.Request | None, requirements: EscrowRequirements, terms: Terms) -> None:
        """`request` is None when the SDK plugin pays (it never sees the request)."""
        ...


class AllowAll:
    """The default policy: pays every delivery-escrow 402."""

    def check(self, request: httpx.Request | None, requirements: EscrowRequirements, terms: Terms) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Offer:
    """The delivery-escrow option of a 402, with the envelope it came in."""

    required: PaymentRequired
    model: PaymentRequirements
    requirements: EscrowRequirements


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed, journaled payment, ready to send."""

    escrow_id: bytes
    terms: Terms
    escrow: ChecksumAddress
    valid_before: int
    header: str


def journal_headers(request: httpx.Request) -> dict[str, str]:
    """The request headers a replay needs, without credentials."""
    return {k: v for k, v in request.headers.items() if k.lower() not in _UNJOURNALED_HEADERS}


def find_offer(response: httpx.Response) -> Offer | None:
    """The delivery-escrow option of a 402; None if the response offers none (not ours to pay)."""
    if response.status_code != 402:
        return None
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is None:
        return None
    try:
        required = decode_payment_required(value)
    except ProtocolError as exc:
        raise PaymentRefused("invalid_payment_required", str(exc)) from None
    for model in required.accepts:
        if model.scheme == SCHEME:
            try:
                return Offer(required, model, EscrowRequirements.from_model(model))
            except ProtocolError as exc:
                raise PaymentRefused("invalid_requirements", str(exc)) from None
    return None


class BuyerChain:
    """The buyer's read-only view of the chain behind `rpc_url`, plus its refund sender."""

    def __init__(self, rpc_url: str, *, w3: Web3 | None = None, timeout: float = 30.0) -> None:
        self.w3 = w3 or Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self._chain_id: int | None = None
        self._domains: dict[str, TokenDomain] = {}
        self._lock = threading.Lock()

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def now(self) -> int:
        """The latest block's timestamp: the clock the contract judges deadlines by."""
        return rpc.latest_timestamp(self.w3)

    def domain(self, token: str) -> TokenDomain:
        with self._lock:
            if token not in self._domains:
                self._domains[token] = Token(self.w3, token).domain(self.chain_id)
            return self._domains[token]

    def escrow(self, address: str) -> Escrow:
        return Escrow(self.w3, address)


class PaymentCore:
    """Builds, signs, journals and judges payments for one signer; shared by every client form.

    `policy` is a declarative Policy (rules and budgets, reserved in the ledger), or a custom
    PaymentPolicy hook, or None (pay every offer; the ledger still records every payment).
    `task` names the budget a payment counts against (a request can override it with the
    `x402_task` extension); `validator` checks delivered bodies (override: `x402_validator`).
    """

    def __init__(
        self,
        signer: Signer,
        rpc_url: str,
        journal: str | Path | Journal,
        *,
        policy: Policy | PaymentPolicy | None = None,
        task: str = "default",
        validator: Validator | None = None,
        w3: Web3 | None = None,
    ) -> None:
        self.signer = signer
        self.chain = BuyerChain(rpc_url, w3=w3)
        self.journal = journal if isinstance(journal, Journal) else Journal(journal)
        self.rules: Policy | None = policy if isinstance(policy, Policy) else None
        self.hook: PaymentPolicy | None = None if policy is None or isinstance(policy, Policy) else policy
        self.task = task
        self.validator = validator

    @property
    def policy(self) -> PaymentPolicy:
        """The custom hook (AllowAll when there is none)."""
        return self.hook if self.hook is not None else AllowAll()

    def _decide(self, request: httpx.Request | None, req: EscrowRequirements, terms: Terms, escrow_id: bytes) -> None:
        """The policy's verdict, audited; on allow the amount is reserved in the ledger. Raises PolicyDenied."""
        task = self.task
        if request is not None and isinstance(request.extensions.get(TASK_EXTENSION), str):
            task = request.extensions[TASK_EXTENSION]
        ctx = PaymentContext(
            network=req.network,
            token=terms.token,
            escrow=req.extra.escrow,
            seller=terms.seller,
            host=None if request is None else request.url.host,
            amount=terms.amount,
            deadline_seconds=req.max_timeout_seconds,
            task=task,
        )
        if self.rules is not None and not (offer := self.rules.check_offer(ctx)).allowed:
            self.journal.audit_decision(escrow_id, terms, ctx, offer)
            raise _denied(offer)
        if self.hook is not None:
            try:
                self.hook.check(request, req, terms)
            except PolicyDenied as denied:
                self.journal.audit_decision(escrow_id, terms, ctx, Decision(False, ReasonCode.CUSTOM, denied.reason))
                raise
        decision = self.journal.reserve(escrow_id, terms, ctx, self.rules)
        if not decision.allowed:
            raise _denied(decision)

    def validate(self, escrow_id: bytes, request: httpx.Request | None, response: httpx.Response) -> None:
        """Run the request's (or the client's) validator on a verified delivery; raises ResponseInvalid."""
        validator = self.validator
        if request is not None and request.extensions.get(VALIDATOR_EXTENSION) is not None:
            validator = request.extensions[VALIDATOR_EXTENSION]
        if validator is None:
            return
        if (problem := problem_with(validator, response)) is not None:
            self.journal.record_invalid(escrow_id, problem)
            raise ResponseInvalid(escrow_id, problem, response.content)

    def sign(
        self, req: EscrowRequirements, rhash: bytes, request: httpx.Request | None
    ) -> tuple[Terms, Authorization, bytes]:
        """Check the requirements against the chain, build fresh terms, ask the policy, sign; raises PaymentRefused."""
        chain_id = self.chain.chain_id
        if req.chain_id != chain_id:
            raise PaymentRefused("network_mismatch", f"the offer is for {req.network} but the RPC is chain {chain_id}")
        if req.max_timeout_seconds > MAX_DEADLINE_WINDOW:
            raise PaymentRefused(
                "deadline_too_far", f"maxTimeoutSeconds {req.max_timeout_seconds} exceeds {MAX_DEADLINE_WINDOW}"
            )
        domain = self.chain.domain(req.asset)
        if (domain.name, domain.version) != (req.extra.name, req.extra.version):
            raise PaymentRefused(
                "token_domain_mismatch",
                f"token {req.asset} signs as ({domain.name!r}, {domain.version!r}), the offer says "
                f"({req.extra.name!r}, {req.extra.version!r})",
            )
        balance = Token(self.chain.w3, req.asset).balance_of(self.signer.address)
        if balance < req.amount:
            raise PaymentRefused(
                Reason.INSUFFICIENT_BALANCE, f"{self.signer.address} holds {balance} of {req.asset}, needs {req.amount}"
            )
        # The chain's clock, not ours: the contract judges the deadline by block time.
        deadline = self.chain.now() + req.max_timeout_seconds
        terms = Terms(
            buyer=self.signer.address,
            seller=req.pay_to,
            operator=req.extra.operator,
            token=req.asset,
            amount=req.amount,
            deadline=deadline,
            request_hash=rhash,
            salt=Terms.new_salt(),
        )
        authorization = authorization_for(terms, req.extra.escrow, chain_id, 0, deadline)
        self._decide(request, req, terms, authorization.nonce)
        try:
            return terms, authorization, sign_authorization(self.signer, domain, authorization)
        except BaseException:
            self.journal.cancel_reservation(authorization.nonce)  # nothing was signed, nothing can be sent
            raise

    def prepare(self, request: httpx.Request, offer: Offer) -> Prepared:
        """Check the offer, build and sign the terms, and journal them durably; raises PaymentRefused."""
        req = offer.requirements
        body = request.content
        url = canonical_url(str(request.url))
        expected = request_hash(request.method, url, body)
        if expected != req.extra.request_hash:
            raise RequestHashMismatch(expected, req.extra.request_hash, request.method, url)
        terms, authorization, signature = self.sign(req, expected, request)
        payload = PaymentPayload(
            x402_version=X402_VERSION,
            resource=offer.required.resource,
            accepted=offer.model,
            payload=EscrowPayload(authorization, signature, terms).to_json(),
        )
        header = encode_payment_signature(payload)
        # Durable before the header can leave the process: a crash from here on is recoverable.
        self.record_payment(
            escrow_id=authorization.nonce,
            chain_id=self.chain.chain_id,
            escrow=req.extra.escrow,
            method=request.method,
            url=url,
            headers=journal_headers(request),
            body=body,
            terms=terms,
            valid_before=authorization.valid_before,
            payment_header=header,
        )
        return Prepared(authorization.nonce, terms, req.extra.escrow, authorization.valid_before, header)

    def record_payment(self, **fields: Any) -> None:
        """journal.record, releasing the reservation if the row could not be written (the header is never sent)."""
        try:
            self.journal.record(**fields)
        except BaseException:
            self.journal.cancel_reservation(fields["escrow_id"])
            raise

    def settle(self, prepared: Prepared, response: httpx.Response) -> None:
        """Judge the answer to the paid request: returns if the body is the one paid for, else raises."""
        judge_response(
            self,
            escrow_id=prepared.escrow_id,
            terms=prepared.terms,
            escrow=prepared.escrow,
            valid_before=prepared.valid_before,
            response=response,
        )


def judge_response(
    core: PaymentCore, *, escrow_id: bytes, terms: Terms, escrow: str, valid_before: int, response: httpx.Response
) -> None:
    """Journal what the answer to a paid (or replayed) request says, and raise unless it is a verified delivery."""
    journal = core.journal
    value = response.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is None:
        reason = _refusal_reason(response)
        state = core.chain.escrow(escrow).state_of(escrow_id)
        if state is State.NONE:
            journal.update(escrow_id, PaymentState.REJECTED, detail=f"{response.status_code} {reason}")
            raise PaymentRejected(escrow_id, reason, response.status_code, valid_before)
        if state is State.REFUNDED:
            journal.update(escrow_id, PaymentState.REFUNDED, detail=f"{response.status_code} {reason}")
            raise HandlerFailedRefunded(escrow_id, None, response.status_code)
        journal.update(escrow_id, PaymentState.HELD, detail=f"{response.status_code} {reason}")
        raise PaymentNotDelivered(
            escrow_id, terms.deadline, f"the seller answered {response.status_code} ({reason}), escrow is {state.name}"
        )
    try:
        settle = decode_payment_response(value)
        extra = SettlementExtra.from_json(settle.extra)
    except ProtocolError as exc:
        journal.update(escrow_id, PaymentState.HELD, detail=f"unreadable PAYMENT-RESPONSE: {exc}")
        raise PaymentNotDelivered(escrow_id, terms.deadline, f"unreadable PAYMENT-RESPONSE ({exc})") from None
    if extra.escrow_id != escrow_id:
        journal.update(escrow_id, PaymentState.HELD, detail="PAYMENT-RESPONSE names another escrow")
        raise PaymentNotDelivered(
            escrow_id, terms.deadline, f"PAYMENT-RESPONSE names escrow 0x{extra.escrow_id.hex()} instead"
        )
    if response.status_code >= 400 or settle.error_reason == Reason.HANDLER_FAILED_REFUNDED:
        state = core.chain.escrow(escrow).state_of(escrow_id)
        if state is State.REFUNDED:
            journal.update(
                escrow_id, PaymentState.REFUNDED, detail=settle.error_reason, tx_hash=extra.refund_transaction
            )
            raise HandlerFailedRefunded(escrow_id, extra.refund_transaction, response.status_code)
        journal.update(escrow_id, PaymentState.HELD, detail=settle.error_reason)
        raise PaymentNotDelivered(
            escrow_id,
            terms.deadline,
            f"the handler failed with {response.status_code} and the escrow is still {state.name}",
        )
    received = delivery_hash(response.content)
    if extra.delivery_hash != received:
        journal.update(escrow_id, PaymentState.MISMATCH, response_hash=received, committed_hash=extra.delivery_hash)
        raise DeliveryMismatch(escrow_id, extra.delivery_hash, received)
    journal.update(escrow_id, PaymentState.DELIVERED, response_hash=received, committed_hash=extra.delivery_hash)


def _denied(decision: Decision) -> PolicyDenied:
    return PolicyDenied(
        decision.detail,
        code=decision.reason.value,
        limit=decision.limit,
        wanted=decision.wanted,
        available=decision.available,
    )


def _refusal_reason(response: httpx.Response) -> str | None:
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is None:
        return None
    try:
        return decode_payment_required(value).error
    except ProtocolError:
        return None
