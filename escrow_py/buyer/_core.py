"""The buyer's steps for one BuyerSettings, in the order a payment takes them:

    offer   (_offer)   the 402's delivery-escrow option, bound to the request it is for     pure
    decide  (_decide)  the policy's offer rules; the ledger's budgets, reserved             pure + ledger
    sign    (_sign)    the offer checked against the chain and fresh terms (before decide:   chain
                       the policy judges the terms), then the signature (after it)
    journal (_journal) the signed payment, durable before it can leave the process          disk
    judge   (_judge)   the answer to the paid request: a Verdict, applied once here         pure + apply

Each client form (escrow_py.buyer._flow's one flow for EscrowAuth and both clients, the SDK plugin,
the MCP client, recover()) calls these; the chain is reached only through `self.chain` (an EscrowChain),
the disk only through `self.journal`. Every step is a plain blocking call; the async forms run them
in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from escrow_py.buyer._chain import CLOCK_SKEW
from escrow_py.buyer._decide import custom_denial, decide, denial, payment_context
from escrow_py.buyer._errors import ChainUnavailable, PolicyDenied, ResponseInvalid
from escrow_py.buyer._journal import Journal
from escrow_py.buyer._judge import Answer, ChainFacts, Need, Payment, Verdict, judge, read_answer
from escrow_py.buyer._offer import Offer, bind, journal_headers
from escrow_py.buyer._policy import Policy
from escrow_py.buyer._settings import BuyerSettings, PaymentPolicy
from escrow_py.buyer._sign import payment_header, payment_payload, terms_for
from escrow_py.buyer._validate import VALIDATOR_EXTENSION, problem_with
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.web3chain import connect_chain
from escrow_py.protocol.eip3009 import Authorization, sign_authorization
from escrow_py.protocol.errors import ChainError
from escrow_py.protocol.terms import State, Terms
from escrow_py.protocol.wire import EscrowRequirements, Unavailable


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed, journaled payment, ready to send.

    `resend_until` (time.monotonic) is the last moment the same payment may be sent again after
    a 503 of the seller's: its validBefore less the ResendPolicy's margin, counted from signing.
    """

    escrow_id: bytes
    terms: Terms
    escrow: str
    valid_before: int
    header: str
    resend_until: float = 0.0


class PaymentCore:
    """The steps of paying, for one signer, chain, journal and policy (a BuyerSettings).

    The journal is opened here unless the settings hold an open Journal; `close()` closes what was opened.
    """

    def __init__(self, settings: BuyerSettings) -> None:
        self.settings = settings
        self.signer = settings.signer
        # The buyer pays whichever genuine escrow an offer names: a chain bound to none, sending (its own
        # refunds, recover()) from the buyer's key; or the settings' own chain (the unit tests' in-memory one).
        self.chain: EscrowChain = settings.chain or connect_chain(
            settings.rpc_url, deadline=settings.rpc_timeout, signer=settings.signer, w3=settings.w3
        )
        self.journal = settings.journal if isinstance(settings.journal, Journal) else Journal(settings.journal)
        policy = settings.policy
        self.rules: Policy | None = policy if isinstance(policy, Policy) else None
        self.hook: PaymentPolicy | None = None if policy is None or isinstance(policy, Policy) else policy

    # -- paying: offer → decide → sign → journal ---------------------------------------------------

    def prepare(self, request: httpx.Request, offer: Offer) -> Prepared:
        """Bind the offer to the request, decide, sign, and journal durably; raises PaymentRefused."""
        req = offer.requirements
        bound = bind(request, offer)
        signing = time.monotonic()  # no later than the chain time the window is counted from
        terms, authorization, signature = self.sign(req, bound.request_hash, request)
        window = authorization.valid_before - (terms.deadline - req.max_timeout_seconds)
        payload = payment_payload(terms, authorization, signature)
        header = payment_header(offer.model, payload, offer.required.resource)
        # Durable before the header can leave the process: a crash from here on is recoverable.
        self.record_payment(
            escrow_id=authorization.nonce,
            chain_id=self.chain.chain_id,
            escrow=req.extra.escrow,
            method=request.method,
            url=bound.url,
            headers=journal_headers(request),
            body=request.content,
            terms=terms,
            valid_before=authorization.valid_before,
            payment_header=header,
        )
        resend_until = signing + window - self.settings.resend.margin
        return Prepared(authorization.nonce, terms, req.extra.escrow, authorization.valid_before, header, resend_until)

    def sign(
        self, req: EscrowRequirements, rhash: bytes, request: httpx.Request | None
    ) -> tuple[Terms, Authorization, bytes]:
        """Check the requirements against the chain, build fresh terms, decide, sign; raises PaymentRefused.

        Nothing is reserved, journaled or signed unless every check passed, the genuine-escrow one first.
        """
        try:
            domain, terms, authorization = terms_for(self.chain, self.signer.address, req, rhash)
        except ChainError as exc:
            raise ChainUnavailable(exc) from exc
        self.decide(request, req, terms, authorization.nonce)
        try:
            return terms, authorization, sign_authorization(self.signer, domain, authorization)
        except BaseException:
            self.journal.cancel_reservation(authorization.nonce)  # nothing was signed, nothing can be sent
            raise

    def decide(self, request: httpx.Request | None, req: EscrowRequirements, terms: Terms, escrow_id: bytes) -> None:
        """The policy's verdict, audited: the offer rules, the caller's hook, then the budgets, reserved in
        the ledger on allow. Raises PolicyDenied."""
        ctx = payment_context(request, req, terms, self.settings.task)
        if not (decision := decide(ctx, self.rules)).allowed:
            self.journal.audit_decision(escrow_id, terms, ctx, decision)
            raise denial(decision)
        if self.hook is not None:
            try:
                self.hook.check(request, req, terms)
            except PolicyDenied as denied:
                self.journal.audit_decision(escrow_id, terms, ctx, custom_denial(denied))
                raise
        decision = self.journal.reserve(escrow_id, terms, ctx, self.rules)
        if not decision.allowed:
            raise denial(decision)

    def record_payment(self, **fields: Any) -> None:
        """journal.record, releasing the reservation if the row could not be written (the header is never sent)."""
        try:
            self.journal.record(**fields)
        except BaseException:
            self.journal.cancel_reservation(fields["escrow_id"])
            raise

    # -- sending again -----------------------------------------------------------------------------

    def resend_after(self, prepared: Prepared, response: httpx.Response, resent: int) -> float | None:
        """After this answer to the paid request, the seconds to wait before sending the same request (same
        PAYMENT-SIGNATURE) again, the resend journaled; None: the answer is final, `settle` judges it.

        Only the seller's own 503 (wire.Unavailable) is resent, within the ResendPolicy.
        """
        unavailable = Unavailable.decode(response.status_code, response.headers, response.content)
        if unavailable is None:
            return None
        time_left = prepared.resend_until - time.monotonic()
        wait = self.settings.resend.next_wait(unavailable.retry_after, resent=resent, time_left=time_left)
        if wait is not None:
            self.journal.record_resend(
                prepared.escrow_id, resent + 1, unavailable.reason, unavailable.retry_after, wait
            )
        return wait

    # -- judging -----------------------------------------------------------------------------------

    def settle(self, payment: Payment, response: httpx.Response, *, replay: bool = False) -> None:
        """Judge the answer to a paid (`replay`: replayed) request, write the verdict to the journal once,
        and raise unless it is a verified delivery."""
        answer = read_answer(response, payment.escrow_id, replay=replay)
        self.apply(payment.escrow_id, judge(answer, payment, self.chain_facts(payment, answer)))

    def chain_facts(self, payment: Payment, answer: Answer) -> ChainFacts:
        """Ask the chain what `answer.needs`; a failed read is kept in the facts for the judge."""
        if answer.needs is Need.NOTHING:
            return ChainFacts()
        state: State | None = None
        if answer.needs is Need.STATE or answer.extra is None or answer.extra.delivery_transaction is None:
            try:
                state = self.chain.state_of(payment.escrow_id, escrow=payment.escrow)
            except ChainError as exc:
                return ChainFacts(state_error=exc)
            if answer.needs is Need.STATE or state is not State.RELEASED:
                return ChainFacts(state=state)  # a delivery still Held has no Delivered event to read
        entry = self.journal.get(payment.escrow_id)
        since = 0 if entry is None else int(entry.created_at) - CLOCK_SKEW
        tx_hash = None if answer.extra is None else answer.extra.delivery_transaction
        try:
            posted = self.chain.delivered_hash(payment.escrow_id, escrow=payment.escrow, since=since, tx_hash=tx_hash)
        except ChainError as exc:
            return ChainFacts(state=state, hash_error=exc)
        return ChainFacts(state=state, posted_hash=posted)

    def apply(self, escrow_id: bytes, verdict: Verdict) -> None:
        """Write a verdict to the journal (once) and raise its error, if it has one."""
        if verdict.state is not None:
            self.journal.update(
                escrow_id,
                verdict.state,
                detail=verdict.detail,
                response_hash=verdict.response_hash,
                committed_hash=verdict.committed_hash,
                tx_hash=verdict.tx_hash,
            )
        if verdict.error is not None:
            raise verdict.error

    def validate(self, escrow_id: bytes, request: httpx.Request | None, response: httpx.Response) -> None:
        """Run the request's (or the settings') validator on a verified delivery; raises ResponseInvalid."""
        validator = self.settings.validator
        if request is not None and request.extensions.get(VALIDATOR_EXTENSION) is not None:
            validator = request.extensions[VALIDATOR_EXTENSION]
        if validator is None:
            return
        if (problem := problem_with(validator, response)) is not None:
            self.journal.record_invalid(escrow_id, problem)
            raise ResponseInvalid(escrow_id, problem, response.content)

    def close(self) -> None:
        """Close the journal if this core opened it (an open Journal in the settings is the caller's)."""
        if self.journal is not self.settings.journal:
            self.journal.close()
