"""What the sync client, the async client and the httpx.Auth hook share: reading a 402,
building and signing the terms, journaling them, and judging the paid response.

Every step that talks to the chain or the disk is a plain blocking call; the async
flow runs those in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from eth_typing import ChecksumAddress
from web3 import Web3
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, SettleResponse

from escrow_py.buyer._errors import (
    ChainUnavailable,
    DeliveryMismatch,
    EscrowNotGenuine,
    HandlerFailedRefunded,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentRejected,
    PolicyDenied,
    RequestHashMismatch,
    ResponseInvalid,
)
from escrow_py.buyer._journal import Journal, PaymentState
from escrow_py.buyer._policy import Decision, PaymentContext, Policy
from escrow_py.buyer._validate import TASK_EXTENSION, VALIDATOR_EXTENSION, Validator, problem_with
from escrow_py.chain import rpc
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.signer import Signer
from escrow_py.chain.web3chain import Web3EscrowChain, connect_chain
from escrow_py.protocol.eip3009 import Authorization, TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.errors import ChainError, ConfigError, ContractRevert, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, State, Terms, canonical_url, delivery_hash, request_hash
from escrow_py.protocol.wire import (
    DEPOSIT_MAY_BE_PENDING,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SCHEME,
    X402_VERSION,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    SettlementStatus,
    Unavailable,
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
    """A signed, journaled payment, ready to send.

    `resend_until` (time.monotonic) is the last moment the same payment may be sent again after
    a 503 of the seller's: its validBefore less the ResendPolicy's margin, counted from signing.
    """

    escrow_id: bytes
    terms: Terms
    escrow: ChecksumAddress
    valid_before: int
    header: str
    resend_until: float = 0.0


@dataclass(frozen=True, slots=True)
class ResendPolicy:
    """How a paid request answers the seller's own failures (a 503 with Retry-After, wire.Unavailable).

    The same PAYMENT-SIGNATURE is sent again after Retry-After, capped at `max_wait` seconds, at
    most `attempts` times, and never later than `margin` seconds before the authorization's
    validBefore (the seller needs time left to deposit and serve it). A fresh payment is never
    signed for it. `ResendPolicy(attempts=0)` turns resending off.
    """

    attempts: int = 4
    max_wait: float = 10.0
    margin: float = 20.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 0:
            raise ConfigError(f"ResendPolicy.attempts must be an integer >= 0, got {self.attempts!r}")
        for name in ("max_wait", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"ResendPolicy.{name} must be a number of seconds >= 0, got {value!r}")

    def next_wait(self, retry_after: int, *, resent: int, time_left: float) -> float | None:
        """Seconds to wait before resending after `resent` resends, with `time_left` seconds until
        `resend_until`; None: give up (no attempts left, or the wait would run past the margin)."""
        if resent >= self.attempts:
            return None
        wait = float(min(max(retry_after, 0), self.max_wait))
        return wait if wait <= time_left else None


def journal_headers(request: httpx.Request) -> dict[str, str]:
    """The request headers a replay needs, without credentials.

    A Host header the caller chose (virtual hosting: another name than the URL's) is kept: the seller
    hashes the URL from it, so a replay without it would be another request.
    """
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _UNJOURNALED_HEADERS}
    host = request.headers.get("host")
    if host is not None and host != request.url.netloc.decode("ascii"):
        headers["host"] = host
    return headers


def wire_url(request: httpx.Request) -> str:
    """The URL as the request carries it over the wire: scheme, the Host header as sent, the raw target.

    What the seller hashes (terms.canonical_url of its scheme, Host and raw path), so both sides
    canonicalise the same bytes: httpx's percent-encoded path and query, and a Host header that
    may name another host than the URL's.
    """
    host = request.headers.get("host") or request.url.netloc.decode("ascii")
    return f"{request.url.scheme}://{host}{request.url.raw_path.decode('ascii')}"


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
        raise PaymentRefused(Reason.INVALID_PAYMENT_REQUIRED, str(exc)) from None
    for model in required.accepts:
        if model.scheme == SCHEME:
            try:
                return Offer(required, model, EscrowRequirements.from_model(model))
            except ProtocolError as exc:
                raise PaymentRefused(Reason.INVALID_REQUIREMENTS, str(exc)) from None
    return None


class PaymentCore:
    """Builds, signs, journals and judges payments for one signer; shared by every client form.

    `policy` is a declarative Policy (rules and budgets, reserved in the ledger), or a custom
    PaymentPolicy hook, or None (pay every offer; the ledger still records every payment).
    `task` names the budget a payment counts against (a request can override it with the
    `x402_task` extension); `validator` checks delivered bodies (override: `x402_validator`).
    `rpc_timeout` bounds every chain call (chain.web3chain); `resend` says how a 503 of the seller's own
    side is answered (ResendPolicy).
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
        rpc_timeout: float = rpc.DEFAULT_DEADLINE,
        resend: ResendPolicy | None = None,
        chain: EscrowChain | None = None,
    ) -> None:
        if resend is not None and not isinstance(resend, ResendPolicy):
            raise ConfigError(f"resend must be a ResendPolicy, got {resend!r}")
        self.signer = signer
        self.resend = resend if resend is not None else ResendPolicy()
        if isinstance(rpc_timeout, bool) or not isinstance(rpc_timeout, (int, float)) or not rpc_timeout > 0:
            raise ConfigError(f"rpc_timeout must be a number of seconds > 0, got {rpc_timeout!r}")
        # The buyer pays whichever genuine escrow an offer names: a chain bound to none, sending (its own
        # refunds, recover()) from the buyer's key.
        # `chain`: another EscrowChain than the node at rpc_url (the unit tests' in-memory one).
        self.chain: EscrowChain = chain or connect_chain(rpc_url, deadline=rpc_timeout, signer=signer, w3=w3)
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
            settlement=req.extra.settlement.value,
        )
        if self.rules is not None and not (offer := self.rules.check_offer(ctx)).allowed:
            self.journal.audit_decision(escrow_id, terms, ctx, offer)
            raise _denied(offer)
        if self.hook is not None:
            try:
                self.hook.check(request, req, terms)
            except PolicyDenied as denied:
                self.journal.audit_decision(escrow_id, terms, ctx, Decision(False, Reason.CUSTOM, denied.reason))
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
        """Check the requirements against the chain, build fresh terms, ask the policy, sign; raises PaymentRefused.

        Nothing is reserved, journaled or signed unless every check passed, the genuine-escrow one first.
        """
        try:
            domain, terms, authorization = self._terms_for(req, rhash)
        except ChainError as exc:
            raise ChainUnavailable(exc) from exc
        self._decide(request, req, terms, authorization.nonce)
        try:
            return terms, authorization, sign_authorization(self.signer, domain, authorization)
        except BaseException:
            self.journal.cancel_reservation(authorization.nonce)  # nothing was signed, nothing can be sent
            raise

    def _terms_for(self, req: EscrowRequirements, rhash: bytes) -> tuple[TokenDomain, Terms, Authorization]:
        """The offer's checks against the chain, then fresh terms and their authorization (unsigned)."""
        chain_id = self.chain.chain_id
        if req.chain_id != chain_id:
            raise PaymentRefused(
                Reason.NETWORK_MISMATCH, f"the offer is for {req.network} but the RPC is chain {chain_id}"
            )
        # The token lets only `to` redeem the authorization: `to` must be the genuine escrow, or anyone
        # naming their own wallet (or a look-alike contract) as the escrow takes the money.
        if not (check := self.chain.check_escrow(req.extra.escrow)).genuine:
            raise EscrowNotGenuine(check)
        if req.max_timeout_seconds > MAX_DEADLINE_WINDOW:
            raise PaymentRefused(
                Reason.DEADLINE_TOO_FAR, f"maxTimeoutSeconds {req.max_timeout_seconds} exceeds {MAX_DEADLINE_WINDOW}"
            )
        try:
            domain = self.chain.token_domain(req.asset)
        except ContractRevert as exc:  # no code there, or it reverts
            raise PaymentRefused(
                Reason.ASSET_NOT_ERC3009, f"the offer's asset {req.asset} does not answer name() and version() ({exc})"
            ) from exc
        if (domain.name, domain.version) != (req.extra.name, req.extra.version):
            raise PaymentRefused(
                Reason.TOKEN_DOMAIN_MISMATCH,
                f"token {req.asset} signs as ({domain.name!r}, {domain.version!r}), the offer says "
                f"({req.extra.name!r}, {req.extra.version!r})",
            )
        # The balance and the next block's time at once: one round trip on the paying path.
        balance, next_time = rpc.both(
            lambda: self.chain.balance_of(req.asset, self.signer.address), self.chain.next_block_time
        )
        if balance < req.amount:
            raise PaymentRefused(
                Reason.INSUFFICIENT_BALANCE, f"{self.signer.address} holds {balance} of {req.asset}, needs {req.amount}"
            )
        # The contract (deadline) and the token (validBefore) judge the deposit by the time of the block
        # that includes it. That is the next block's time, not the latest block's: on a chain that mines
        # only on demand the latest block can be older than the whole window.
        deadline = next_time + req.max_timeout_seconds
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
        # validBefore = deadline: a deposit after the deadline reverts anyway, one before it needs the token's consent.
        return domain, terms, authorization_for(terms, req.extra.escrow, chain_id, 0, deadline)

    def prepare(self, request: httpx.Request, offer: Offer) -> Prepared:
        """Check the offer, build and sign the terms, and journal them durably; raises PaymentRefused."""
        req = offer.requirements
        body = request.content
        try:
            url = canonical_url(str(request.url))  # where a replay connects to
            hashed = canonical_url(wire_url(request))  # what the seller hashes: the same unless Host was set
        except ValueError:
            # Not quoted: the URL's userinfo is a credential.
            raise PaymentRefused(
                Reason.INVALID_URL,
                f"the {request.method} URL to host {request.url.host!r} has no canonical form (credentials in the "
                "URL, or a host that is not plain ASCII), so no requestHash can bind it",
            ) from None
        expected = request_hash(request.method, hashed, body)
        if expected != req.extra.request_hash:
            raise RequestHashMismatch(expected, req.extra.request_hash, request.method, hashed)
        signing = time.monotonic()  # no later than the chain time the window is counted from
        terms, authorization, signature = self.sign(req, expected, request)
        window = authorization.valid_before - (terms.deadline - req.max_timeout_seconds)
        payload = PaymentPayload(
            x402_version=X402_VERSION,
            resource=offer.required.resource,
            accepted=offer.model,
            payload=EscrowPayload(authorization=authorization, signature=signature, terms=terms).to_json(),
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
        resend_until = signing + window - self.resend.margin
        return Prepared(authorization.nonce, terms, req.extra.escrow, authorization.valid_before, header, resend_until)

    def record_payment(self, **fields: Any) -> None:
        """journal.record, releasing the reservation if the row could not be written (the header is never sent)."""
        try:
            self.journal.record(**fields)
        except BaseException:
            self.journal.cancel_reservation(fields["escrow_id"])
            raise

    def resend_after(self, prepared: Prepared, response: httpx.Response, resent: int) -> float | None:
        """After this answer to the paid request, the seconds to wait before sending the same request (same
        PAYMENT-SIGNATURE) again, the resend journaled; None: the answer is final, `settle` judges it.

        Only the seller's own 503 (wire.Unavailable) is resent, within the ResendPolicy.
        """
        unavailable = Unavailable.decode(response.status_code, response.headers, response.content)
        if unavailable is None:
            return None
        time_left = prepared.resend_until - time.monotonic()
        wait = self.resend.next_wait(unavailable.retry_after, resent=resent, time_left=time_left)
        if wait is not None:
            self.journal.record_resend(
                prepared.escrow_id, resent + 1, unavailable.reason, unavailable.retry_after, wait
            )
        return wait

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


# Wall clock (journal) against chain clock (blocks): how far apart they may be when bounding a log search.
CLOCK_SKEW = 3600


def delivered_hash(
    w3: Web3, escrow: str, escrow_id: bytes, *, since: int = 0, tx_hash: bytes | None = None
) -> bytes | None:
    """The delivery hash the seller posted on chain for `escrow_id` (its Delivered event), if any.

    `tx_hash`, the seller's pointer to its deliverMany, is checked first (one receipt);
    otherwise the logs are searched from chain time `since` on, in chunks a public RPC accepts.
    (EscrowChain.delivered_hash on a chain behind an existing web3 connection.)
    """
    return Web3EscrowChain(w3).delivered_hash(escrow_id, escrow=escrow, since=since, tx_hash=tx_hash)


def judge_response(
    core: PaymentCore,
    *,
    escrow_id: bytes,
    terms: Terms,
    escrow: str,
    valid_before: int,
    response: httpx.Response,
    replay: bool = False,
) -> None:
    """Journal what the answer to a paid (or replayed) request says, and raise unless it is a verified delivery.

    Once a delivery is posted, the chain is the judge, not the answer's header: a replay (`replay`), or an
    answer whose seller says the delivery is posted, is checked against the Delivered event's hash.
    """
    journal = core.journal

    def chain_state(answer: str) -> State:
        # The signed payment has left the process: a chain failure now must still say where the money is.
        try:
            return core.chain.state_of(escrow_id, escrow=escrow)
        except ChainError as exc:
            raise PaymentNotDelivered(
                escrow_id,
                terms.deadline,
                f"{answer}, and the escrow's state could not be read ({exc}); the money stays in the buyer's "
                f"wallet unless the signed authorization is deposited before {valid_before}",
                escrow=escrow,
            ) from exc

    value = response.headers.get(PAYMENT_RESPONSE_HEADER)
    if value is None:
        unavailable = Unavailable.decode(response.status_code, response.headers, response.content)
        reason = unavailable.reason.value if unavailable is not None else _refusal_reason(response)
        state = chain_state(f"the seller answered {response.status_code} ({reason})")
        if state is State.NONE and unavailable is not None and unavailable.reason in DEPOSIT_MAY_BE_PENDING:
            # Not deposited when checked, but the seller may have sent the deposit: it can still land.
            detail = f"{response.status_code} {reason}: a deposit may be pending"
            journal.update(escrow_id, PaymentState.SIGNED, detail=detail)
            raise PaymentNotDelivered(
                escrow_id,
                terms.deadline,
                f"the seller answered {response.status_code} ({reason}: {unavailable.message}) and the escrow "
                f"was not deposited when checked; a deposit the seller sent may still land before {valid_before}",
                escrow=escrow,
            )
        if state is State.NONE:
            journal.update(escrow_id, PaymentState.REJECTED, detail=f"{response.status_code} {reason}")
            raise PaymentRejected(escrow_id, reason, response.status_code, valid_before)
        if state is State.REFUNDED:
            journal.update(escrow_id, PaymentState.REFUNDED, detail=f"{response.status_code} {reason}")
            raise HandlerFailedRefunded(escrow_id, None, response.status_code)
        journal.update(escrow_id, PaymentState.HELD, detail=f"{response.status_code} {reason}")
        raise PaymentNotDelivered(
            escrow_id,
            terms.deadline,
            f"the seller answered {response.status_code} ({reason}), escrow is {state.name}",
            escrow=escrow,
        )
    try:
        settle = decode_payment_response(value)
        extra = SettlementExtra.from_json(settle.extra)
    except ProtocolError as exc:
        journal.update(escrow_id, PaymentState.HELD, detail=f"unreadable PAYMENT-RESPONSE: {exc}")
        raise PaymentNotDelivered(
            escrow_id, terms.deadline, f"unreadable PAYMENT-RESPONSE ({exc})", escrow=escrow
        ) from None
    if extra.escrow_id != escrow_id:
        journal.update(escrow_id, PaymentState.HELD, detail="PAYMENT-RESPONSE names another escrow")
        raise PaymentNotDelivered(
            escrow_id, terms.deadline, f"PAYMENT-RESPONSE names escrow 0x{extra.escrow_id.hex()} instead", escrow=escrow
        )
    if settle.error_reason == Reason.HANDLER_FAILED_NOT_CHARGED and response.status_code >= 400:
        # Served first and the handler failed: the seller sent nothing to the chain. The authorization
        # stays valid until validBefore; recover() voids it then, unless the chain shows it used.
        journal.update(escrow_id, PaymentState.REJECTED, detail=f"{response.status_code} {settle.error_reason}")
        raise PaymentRejected(escrow_id, settle.error_reason, response.status_code, valid_before)
    if response.status_code >= 400 or settle.error_reason == Reason.HANDLER_FAILED_REFUNDED:
        state = chain_state(f"the handler failed with {response.status_code}")
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
            escrow=escrow,
        )
    received = delivery_hash(response.content)
    _judge_delivered(
        core, escrow_id=escrow_id, escrow=escrow, extra=extra, settle=settle, received=received, replay=replay,
        chain_state=chain_state,
    )  # fmt: skip


def _judge_delivered(
    core: PaymentCore,
    *,
    escrow_id: bytes,
    escrow: str,
    extra: SettlementExtra,
    settle: SettleResponse,
    received: bytes,
    replay: bool,
    chain_state: Callable[[str], State],
) -> None:
    """An answer with the bytes: delivered if they match the committed hash (the chain's, once posted),
    unsettled if they were served first, a mismatch otherwise."""
    journal = core.journal
    committed = extra.delivery_hash
    served_first = extra.settlement in (SettlementStatus.PENDING, SettlementStatus.SETTLED)
    served_first = served_first or settle.error_reason == Reason.SETTLEMENT_FAILED
    posted = replay or extra.delivery_transaction is not None or extra.state is State.RELEASED
    if committed == received and posted and not served_first:
        # A served-first payment never had an escrow, so no Delivered event holds its hash.
        committed = _posted_hash(core, escrow_id, escrow, extra, chain_state) or committed
    if committed != received:
        journal.update(escrow_id, PaymentState.MISMATCH, response_hash=received, committed_hash=committed)
        raise DeliveryMismatch(escrow_id, committed, received)
    if served_first:
        # Served first: the bytes are here and match the seller's hash, the money has not moved (or the
        # seller says it has). Only the chain closes it (recover(): Settled event, or validBefore passed).
        journal.update(
            escrow_id,
            PaymentState.UNSETTLED,
            detail=f"served first; settlement {extra.settlement or settle.error_reason}",
            response_hash=received,
            committed_hash=committed,
        )
        return
    journal.update(escrow_id, PaymentState.DELIVERED, response_hash=received, committed_hash=committed)


def _posted_hash(
    core: PaymentCore, escrow_id: bytes, escrow: str, extra: SettlementExtra, chain_state: Callable[[str], State]
) -> bytes | None:
    """The hash the chain holds for a delivery already posted (None while the escrow is still Held)."""
    if extra.delivery_transaction is None and chain_state("a replayed delivery") is not State.RELEASED:
        return None
    entry = core.journal.get(escrow_id)
    since = 0 if entry is None else int(entry.created_at) - CLOCK_SKEW
    try:
        return core.chain.delivered_hash(escrow_id, escrow=escrow, since=since, tx_hash=extra.delivery_transaction)
    except ChainError as exc:
        raise PaymentNotDelivered(
            escrow_id, extra.deadline, f"the delivery's on-chain hash could not be read ({exc})", escrow=escrow
        ) from exc


def _denied(decision: Decision) -> PolicyDenied:
    return PolicyDenied(
        decision.detail,
        code=decision.reason,
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
