"""The buyer's steps for one BuyerSettings, in the order a payment takes them:

    offer   (_offer)   the 402's delivery-escrow option, bound to the request it is for     pure
    sign    (_sign)    the offer checked against the chain and fresh terms (before decide:   chain
                       the policy judges the terms)
    decide  (_decide)  the policy's offer rules and the caller's hook                       pure
    journal (_journal) in one transaction: the ledger's budgets decided and the amount      disk
                       reserved, the signature made (_sign), the signed payment recorded;
                       durable before it can leave the process
    judge   (_judge)   the answer to the paid request: a Verdict, applied once here         pure + apply

Each client form (escrow_py.buyer._flow's one flow for EscrowAuth and both clients, the SDK plugin,
the MCP client, recover()) calls these; the chain is reached only through `self.chain` (an EscrowChain),
the disk only through `self.journal`. Every step is a plain blocking call; the async forms run them
in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from x402.schemas import PaymentRequirements, ResourceInfo

from escrow_py.buyer._chain import CLOCK_SKEW
from escrow_py.buyer._decide import custom_denial, decide, denial, payment_context
from escrow_py.buyer._errors import ChainUnavailable, PolicyDenied, ResponseInvalid
from escrow_py.buyer._journal import Journal, PaymentRow, PaymentState, Replay
from escrow_py.buyer._judge import Answer, ChainFacts, Need, Payment, Verdict, judge, read_answer
from escrow_py.buyer._offer import Offer, bind, journal_headers
from escrow_py.buyer._policy import PaymentContext, Policy
from escrow_py.buyer._settings import BuyerSettings, PaymentPolicy
from escrow_py.buyer._sign import Signed, sign_payment, terms_for
from escrow_py.buyer._validate import VALIDATOR_EXTENSION, problem_with
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.web3chain import connect_chain
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

    # -- paying: offer → sign (terms) → decide → journal (budgets, signature, row) ---------------------

    def prepare(self, request: httpx.Request, offer: Offer) -> Prepared:
        """Bind the offer to the request, decide, sign, and journal durably; raises PaymentRefused."""
        req = offer.requirements
        bound = bind(request, offer)
        signing = time.monotonic()  # no later than the chain time the window is counted from
        replay = Replay(request.method, bound.url, journal_headers(request), request.content)
        signed = self.pay(
            req, bound.request_hash, request, accepted=offer.model, resource=offer.required.resource, replay=replay
        )
        terms, authorization = signed.terms, signed.authorization
        window = authorization.valid_before - (terms.deadline - req.max_timeout_seconds)
        resend_until = signing + window - self.settings.resend.margin
        return Prepared(authorization.nonce, terms, req.extra.escrow, authorization.valid_before, signed.header,
                        resend_until)  # fmt: skip

    def pay(
        self,
        req: EscrowRequirements,
        rhash: bytes,
        request: httpx.Request | None,
        *,
        accepted: PaymentRequirements,
        resource: ResourceInfo | None = None,
        replay: Replay,
    ) -> Signed:
        """Check the requirements against the chain and build fresh terms, decide, then reserve the amount, sign
        and journal the payment in one journal transaction; durable when this returns. Raises PaymentRefused.

        Nothing is reserved, journaled or signed unless every check passed, the genuine-escrow one first and the
        budgets last; a crash before the commit leaves nothing reserved, recorded or sent.
        """
        try:
            domain, terms, authorization = terms_for(self.chain, self.signer.address, req, rhash)
        except ChainError as exc:
            raise ChainUnavailable(exc) from exc
        ctx = self.decide(request, req, terms, authorization.nonce)
        signed: Signed | None = None

        def sign() -> PaymentRow:
            nonlocal signed
            signed = sign_payment(self.signer, domain, terms, authorization, accepted=accepted, resource=resource)
            return self.row(signed, req.extra.escrow, replay)

        decision = self.journal.reserve_and_record(authorization.nonce, terms, ctx, self.rules, sign)
        if signed is None:  # the budgets said no: nothing was signed
            raise denial(decision)
        return signed

    def decide(
        self, request: httpx.Request | None, req: EscrowRequirements, terms: Terms, escrow_id: bytes
    ) -> PaymentContext:
        """The offer rules' and the caller's hook's verdict (a denial audited; raises PolicyDenied); the context
        the budgets are then decided in (by the journal, in the transaction that reserves the amount)."""
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
        return ctx

    def row(self, signed: Signed, escrow: str, replay: Replay) -> PaymentRow:
        """The journal row of a signed payment to `escrow`, for `replay`'s request."""
        return PaymentRow(
            escrow_id=signed.authorization.nonce,
            chain_id=self.chain.chain_id,
            escrow=escrow,
            method=replay.method,
            url=replay.url,
            headers=replay.headers,
            body=replay.body,
            terms=signed.terms,
            valid_before=signed.authorization.valid_before,
            payment_header=signed.header,
        )

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
            entry = self.journal.get(escrow_id)
            settled = entry is None or entry.state is not PaymentState.UNSETTLED
            raise ResponseInvalid(escrow_id, problem, response.content, settled=settled)

    def close(self) -> None:
        """Close the journal if this core opened it (an open Journal in the settings is the caller's)."""
        if self.journal is not self.settings.journal:
            self.journal.close()
