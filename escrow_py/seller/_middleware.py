"""The seller's ASGI middleware: the adapter between ASGI and the payment state machine (_machine.py).

It carries out a paid request's steps: the 402, the claim on a payment, reading the store's row and
the chain facts a decision needs, and then the machine's steps (the deposit, serve-first's reservation,
the handler, the store writes, the answer, the replay). What happens next is never decided here:
`_machine.decide` and the `after_*` functions say it.

Read top-down: EscrowMiddleware's __init__ and __call__, the lifespan, a paid request (`_paid`, the
claim, the settle loop `_settle`), the deposit, serve-first, serving the handler and storing its
answer, then the replay. Elsewhere, so that this file is the request's steps:
- _asgi.py: the ASGI plumbing, no payment logic: which priced route a request reaches (Starlette/
  FastAPI router lookup), the lifespan wrapper, reading the body, running the handler and capturing
  its response, sending the plain, 503 and stored responses;
- _hooks.py: the seller's verify/settle hooks as a request runs them (`abort_on`);
- _machine.py: the decisions, and SellerUnavailable (the 503 a step, a claim or a hook raises);
- _remote.py: FacilitatorMiddleware, this class with a facilitator for its chain side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send
from web3 import Web3
from x402.schemas import PaymentPayload

from escrow_py.chain.escrow import Settlement
from escrow_py.chain.port import EscrowChain
from escrow_py.protocol.errors import (
    ConfigError,
    EscrowError,
    InsufficientFunds,
    NonceConflict,
    TransactionFailed,
    TransactionTimeout,
)
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    EscrowPayload,
    SettlementExtra,
    encode_payment_required,
    encode_payment_response,
    payment_required,
)
from escrow_py.seller._asgi import (
    lifespan,
    priced_route,
    read_body,
    run_handler,
    send_plain,
    send_response,
    send_unavailable,
)
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._claims import Claim, ClaimHeartbeat
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._hooks import HOOK_FAILED, HOOK_RETRY_AFTER, abort_on
from escrow_py.seller._machine import (
    CHAIN_RETRY_AFTER,
    IN_PROGRESS,
    Adopt,
    Answer,
    ChainFacts,
    Deposit,
    DepositFault,
    Facts,
    Forget,
    ParsedPayment,
    Reject,
    Replay,
    ResumeDeposit,
    RouteMode,
    Rules,
    SellerUnavailable,
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
    state_needed,
)
from escrow_py.seller._offers import (
    Offers,
    PaidRequest,
    SellerHooks,
    settle_context,
    verify_context,
    verify_result_context,
)
from escrow_py.seller._poster import DeliveryPoster, Sale, log_sale
from escrow_py.seller._startup import check_chain
from escrow_py.seller._store import Payment, PaymentStatus, Reserve, SellerStore, StoredResponse
from escrow_py.seller._verify import (
    OnchainFacts,
    Refusal,
    VerifiedPayment,
    judge_onchain,
    onchain_from_look,
    read_onchain,
    serve_first_probe,
    verify_offchain,
)

log = logging.getLogger("escrow_py.seller")

# What a payment's first look at the chain simulates (EscrowChain.look's check), and whether it is a
# serve-first settlement's; None: the state and the clock only.
Check = tuple[EscrowPayload | Settlement, bool] | None

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def _blocking(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run web3 and SQLite calls in a worker thread: they block."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class EscrowMiddleware:
    """Prices routes of an ASGI app with delivery-escrow payments (DESIGN.md sections 3 and 4).

        app.add_middleware(EscrowMiddleware, config=SellerConfig(...))

    Unpriced routes pass through untouched. The delivery poster starts and stops
    with the app's lifespan; `await middleware.poster.flush()` runs one pass now.
    `EscrowMiddleware.of(app)` finds the instance inside a Starlette/FastAPI app.
    """

    def __init__(
        self, app: ASGIApp, config: SellerConfig, *, w3: Web3 | None = None, chain: EscrowChain | None = None
    ) -> None:
        if not isinstance(config, SellerConfig):
            raise EscrowError("EscrowMiddleware needs config=SellerConfig(...)")
        self.app = app
        self.config = config
        self.store = SellerStore(config.store)
        # `chain`: another EscrowChain than the node at config.rpc_url (the unit tests' in-memory one).
        self.chain: EscrowChain = chain if chain is not None else seller_chain(config, w3, book=self.store)
        # Names this process in the store's leases: a claim's owner says who holds it.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.poster = DeliveryPoster.of(config, self.chain, self.store, owner=self.replica)
        self.offers = Offers(config)

    # Read once per middleware (FacilitatorMiddleware, built without EscrowMiddleware.__init__, gets them too).
    @functools.cached_property
    def _chain_id(self) -> int:
        return self.config.chain_id

    @functools.cached_property
    def _rules(self) -> Rules:
        return Rules(self.config.min_time_left, self.config.deadline_slack)

    @functools.cached_property
    def _heartbeat(self) -> ClaimHeartbeat:
        return ClaimHeartbeat(self.store, self.config.claim_seconds)

    @staticmethod
    def of(app: Any) -> EscrowMiddleware:
        """The EscrowMiddleware inside a Starlette/FastAPI app (building its middleware stack if needed)."""
        node = app
        if getattr(app, "middleware_stack", False) is None:
            app.middleware_stack = app.build_middleware_stack()
        node = getattr(app, "middleware_stack", app)
        while node is not None:
            if isinstance(node, EscrowMiddleware):
                return node
            node = getattr(node, "app", None)
        raise LookupError("no EscrowMiddleware in this app")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        route = priced_route(self.config, self.app, scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        await self._paid(scope, receive, send, route)

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await lifespan(self.app, scope, receive, send, startup=self._start, shutdown=self.poster.stop)

    async def _start(self) -> str | None:
        """Once the app has started: the start-up checks' verdict, else the delivery poster started."""
        failure = await self._startup_failure()
        if failure is None:
            self.poster.start()
        return failure

    async def _startup_failure(self) -> str | None:
        """check_seller's verdict when the app starts (None: fine, or checks turned off)."""
        if not self.config.startup_checks:
            return None
        try:
            await _blocking(check_chain, self.config, self.chain)
        except ConfigError as exc:
            log.error("seller start-up check failed: %s", exc)
            return str(exc)
        return await self.offers.startup_failure()

    # -- a paid request --------------------------------------------------------------------

    async def _paid(self, scope: Scope, receive: Receive, send: Send, route: PricedRoute) -> None:
        body = await read_body(receive, self.config.max_body_bytes)
        if body is None:
            await send_plain(send, 413, b"request body too large")
            return
        try:
            request = await self.offers.paid_request(scope, route, body)
        except ConfigError as exc:  # a dynamic price or payTo gave something unusable: the seller's bug
            log.error("route %s: %s", _route_name(route), exc)
            await send_plain(send, 500, b"the seller's price for this route is misconfigured")
            return
        header = request.header
        if header is None:
            await self._send_required(send, request, 402, None)
            return
        # The one decoding of the header: every step below gets this value.
        parsed = parse_payment(header, chain_id=self._chain_id, escrow=self.config.escrow)
        if parsed.exact:
            assert parsed.envelope is not None
            await self._pay_exact(scope, receive, send, request, parsed.envelope)
            return
        try:
            if parsed.rejected is not None:
                raise parsed.rejected
            assert parsed.escrow_id is not None
            async with self._claim(parsed.escrow_id) as claim:
                await self._settle(scope, receive, send, request, parsed, claim=claim)
        except Refusal as rejected:
            await self._send_required(send, request, rejected.status, rejected.error)
        except SellerUnavailable as unavailable:
            await send_unavailable(send, unavailable.wire())
        except (EscrowError, OSError) as exc:
            # The chain or the store failed, not the buyer: nothing was served, a retry or replay is safe.
            log.warning("paid request %s %s failed: %s", request.method, request.route.path, exc)
            down = SellerUnavailable(Reason.CHAIN_UNAVAILABLE, "the chain node failed", CHAIN_RETRY_AFTER)
            await send_unavailable(send, down.wire())

    @contextlib.asynccontextmanager
    async def _claim(self, escrow_id: bytes) -> AsyncIterator[Claim | None]:
        """Hold the payment's claim in the store while it is handled: one request, in one replica, at a time.

        The claim is a lease row in the database, so it holds across processes and hosts. A
        copy of a payment another request holds waits for that one's stored answer (and replays
        it) for up to `claim_wait` seconds, then gets 503 payment_in_progress. The holder's process
        renews the claim while it works (_claims.ClaimHeartbeat: on a thread of its own, so a busy
        event loop cannot starve it); if it dies, the claim expires after `claim_seconds` and the next
        copy takes the payment over where the store says it stopped. An answered payment needs
        no claim (None): its replay only reads. The claim is given up in the same store
        transaction that stores the answer (Claim.released), else when the request ends.
        """
        claim = Claim(f"payment:0x{escrow_id.hex()}", f"{self.replica}:{secrets.token_hex(4)}")
        give_up = time.monotonic() + self.config.claim_wait
        pause, first = 0.02, True
        while not (taken := await _blocking(self._answered_or_take, escrow_id, claim, first=first)):
            if taken is None:
                yield None  # answered (before, or by the holder meanwhile): _settle replays its stored response
                return
            if time.monotonic() > give_up:
                raise SellerUnavailable(IN_PROGRESS.reason, IN_PROGRESS.public, IN_PROGRESS.retry_after)
            await asyncio.sleep(pause)
            pause, first = min(pause * 2, 0.25), False
        try:
            yield claim
        finally:
            self._heartbeat.drop(claim)
            if not claim.released:
                # Shielded: a request cancelled by its client still hands the payment on at once.
                with anyio.CancelScope(shield=True), contextlib.suppress(EscrowError, OSError):
                    await _blocking(self.store.release_lease, claim.name, claim.owner)

    def _answered_or_take(self, escrow_id: bytes, claim: Claim, *, first: bool) -> bool | None:
        """One attempt at the claim, in one worker-thread trip: None if the payment is answered (looked at before
        the first attempt, and after each failed one), True once taken, False while another request holds it."""
        if first and self.store.answered(escrow_id):
            return None
        if self._heartbeat.take(claim):
            return True
        return None if self.store.answered(escrow_id) else False

    def _verify(self, parsed: ParsedPayment, request: PaidRequest, chain_time: int) -> VerifiedPayment:
        """The off-chain rules at `chain_time` (FacilitatorMiddleware checks its facilitator's answers with it)."""
        assert parsed.envelope is not None
        return verify_offchain(
            parsed.envelope,
            request.offer,
            chain_time=chain_time,
            min_time_left=self.config.min_time_left,
            deadline_slack=self.config.deadline_slack,
            payload=parsed.payload,
        )

    async def _chain_facts(
        self, need: Facts, escrow_id: bytes, payload: EscrowPayload, *, check: Check = None
    ) -> tuple[ChainFacts, OnchainFacts | None]:
        """The chain facts a decision needs, read in one round trip (EscrowChain.look); with `check`, the
        payment's on-chain checks too (OnchainFacts, judged by _deposit or _serve_first once the machine
        has verified the payment off chain)."""
        if need == Facts.NONE:
            return ChainFacts(), None
        if need == Facts.AUTHORIZATION:
            # The authorization's state is one of the reads made with a settlement's check.
            look = await _blocking(self.chain.look, escrow_id, serve_first_probe(payload))
            if isinstance(look.used, BaseException):
                raise look.used
            return ChainFacts(now=look.now, authorization_used=bool(look.used)), None
        look = await _blocking(self.chain.look, escrow_id, None if check is None else check[0])
        onchain = None if check is None else onchain_from_look(look, serve_first=check[1])
        return ChainFacts(now=look.now, state=look.state), onchain

    def _first_check(self, row: Payment | None, payload: EscrowPayload, mode: RouteMode) -> Check:
        """What a payment's first look at the chain simulates with its state and clock: a serve-first
        settlement, or a new payment's deposit when no seller hook runs between verify and the deposit
        (a hook may abort it, or change what the chain says before the deposit is checked)."""
        if row is not None:
            return None
        if mode.serve_first:
            return serve_first_probe(payload), True
        return (payload, False) if self.config.hooks is None else None

    async def _settle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: PaidRequest,
        parsed: ParsedPayment,
        *,
        claim: Claim | None,
    ) -> None:
        """Fetch the row and the chain facts, ask the machine (_machine.decide), run its steps until one answers."""
        assert parsed.escrow_id is not None and parsed.payload is not None
        escrow_id, payload = parsed.escrow_id, parsed.payload
        row = await self._with_sent_deposit(await _blocking(self.store.payment, escrow_id))
        need = facts_needed(row)
        mode = request.route
        # `onchain`: the on-chain checks read with the facts, for the first Deposit or ServeFirst step.
        facts, onchain = await self._chain_facts(need, escrow_id, payload, check=self._first_check(row, payload, mode))
        hooks = self.config.hooks
        before_verified = after_verified = False
        if hooks is not None and row is None and facts.state == State.NONE:
            # The SDK's order: the seller's before-verify hooks see a new payment before it is verified
            # (hold and serve-first alike: an abort answers 402 before anything is recorded or run).
            await self._before_verify(parsed, request)
            before_verified = True
        step: Step = decide(parsed, request.offer, route=mode, row=row, chain=facts, rules=self._rules)
        while True:
            if isinstance(step, Reject):
                raise step.rejected
            if isinstance(step, Unavailable):
                raise SellerUnavailable(step.reason, step.public, step.retry_after)
            if isinstance(step, Replay):
                assert step.row.response is not None
                await self._replay(send, step.row, step.row.response)
                return
            if isinstance(step, Serve):
                await self._serve(
                    scope, receive, send, request, verified=step.verified, deposit_tx=step.deposit_tx,
                    claim=claim, serve_first=step.serve_first, envelope=parsed.envelope,
                )  # fmt: skip
                return
            if isinstance(step, Adopt):
                row = await self._adopt(step, request)
            elif isinstance(step, ResumeDeposit):
                assert row is not None
                resumed = await self._resume(step)
                if resumed is not None:
                    step = resumed
                    continue
                # Gone from the node, or reverted (another deposit of it may have landed): ask the chain again.
                row = dataclasses.replace(row, deposit_tx=None)
                facts, onchain = await self._chain_facts(Facts.STATE, escrow_id, payload)
            elif isinstance(step, ServeFirst):
                # A fallback to hold does not run the after-verify hooks again: they saw the serve-first checks.
                after_verified = hooks is not None and step.envelope is not None
                step, onchain = await self._serve_first(step, request, mode, onchain), None
                continue
            else:
                if hooks is not None and step.envelope is not None and not before_verified:
                    await self._before_verify(parsed, request)
                step, onchain = await self._deposit(step, request, onchain, after_verified=after_verified), None
                continue
            step = decide(parsed, request.offer, route=mode, row=row, chain=facts, rules=self._rules)

    async def _with_sent_deposit(self, row: Payment | None) -> Payment | None:
        """A `depositing` row with the deposit transaction an earlier request sent for it, if any.

        The signed deposit is kept before broadcast in the operator key's transaction log (the store is
        its NonceBook), under the deposit's intent (its target and calldata), so the row itself is not
        written again for it: the transaction is found there when a request finds the row unanswered.
        """
        if row is None or row.status != PaymentStatus.DEPOSITING or row.deposit_tx is not None or row.payload is None:
            return row
        intent = self.chain.deposit_intent(EscrowPayload.from_json(json.loads(row.payload)))
        sent = await _blocking(self.store.txs_for, self.chain.sender_address, intent)
        return dataclasses.replace(row, deposit_tx=sent[0]) if sent else row

    async def _adopt(self, step: Adopt, request: PaidRequest) -> Payment:
        """Record an escrow deposited by someone else (the buyer, another replica), held, in one transaction."""
        record, row = step.row(PaymentStatus.HELD)
        await _blocking(
            self.store.begin_deposit, row.escrow_id, row.terms, row.accepted_at, _route_name(request.route), record,
            held=True,
        )  # fmt: skip
        return row

    async def _before_verify(self, parsed: ParsedPayment, request: PaidRequest) -> None:
        assert self.config.hooks is not None and parsed.envelope is not None
        context = verify_context(parsed.envelope, request.offer.to_model(), request.context)
        await abort_on(self.config.hooks.before_verify, context)

    async def _pay_exact(
        self, scope: Scope, receive: Receive, send: Send, request: PaidRequest, payload: PaymentPayload
    ) -> None:
        """A payment in the SDK's `exact` scheme: verified and settled through the SDK (_offers.Offers.pay_exact)."""
        outcome = await self.offers.pay_exact(
            payload, request.accepts, request.context, lambda: run_handler(self.app, scope, receive, request.body)
        )
        if outcome.unavailable:
            down = SellerUnavailable(Reason.CHAIN_UNAVAILABLE, "the payment facilitator failed", CHAIN_RETRY_AFTER)
            await send_unavailable(send, down.wire())
        elif outcome.response is None:
            await self._send_required(send, request, 402, outcome.error)
        else:  # no settlement when the handler failed: not charged
            settle = None if outcome.settle is None else encode_payment_response(outcome.settle)
            await send_response(send, outcome.response, settle)

    async def _deposit(
        self, step: Deposit, request: PaidRequest, onchain: OnchainFacts | None = None, *, after_verified: bool = False
    ) -> Step:
        """Check on chain (with `onchain`, a deposit's checks read already), record (a new payment), deposit,
        wait for the receipt; the next step.

        The seller's hooks run around a new payment's deposit (`after_verified`: a serve-first payment
        falling back to hold, whose after-verify hooks ran on its serve-first checks). The buyer's faults are 402s (a
        simulation or a mined deposit that reverts, with the revert in `error`); the seller's own
        are 503s with a reason: the operator cannot pay gas, its nonce is taken, the deposit is not
        confirmed in time.
        """
        verified, chain, hooks = step.verified, self.chain, self.config.hooks
        escrow_id = verified.escrow_id
        context = request.context
        requirements = request.offer.to_model() if hooks is not None else None
        if hooks is not None and step.envelope is not None:
            assert requirements is not None
            if not after_verified:
                await abort_on(hooks.after_verify, verify_result_context(step.envelope, requirements, context,
                                                                          verified.buyer))  # fmt: skip
            await abort_on(hooks.before_settle, settle_context(step.envelope, requirements, context))
        facts = onchain if onchain is not None and not onchain.serve_first else None
        if facts is None:
            facts = await _blocking(read_onchain, verified, chain=chain)
        try:
            gas = judge_onchain(verified, facts)
        except Refusal as rejected:
            if rejected.reason == Reason.SIMULATION_FAILED:
                log.warning("deposit of 0x%s refused: %s (buyer %s)", escrow_id.hex(), rejected, verified.buyer)
            raise
        if step.accepted_at is not None and not await _blocking(
            self.store.begin_deposit, escrow_id, verified.payload.terms, step.accepted_at, _route_name(request.route),
            step.record,
        ):  # fmt: skip
            return IN_PROGRESS
        try:
            # Each signed version is kept in the key's transaction log before it leaves (the store is the
            # sender's NonceBook): a retry finds it there (_with_sent_deposit) and sends no second deposit.
            # The chain encodes the deposit's calldata once, for its simulation and this send (Web3EscrowChain).
            receipt = await _blocking(chain.deposit, verified.payload, gas=gas)
        except (EscrowError, OSError) as exc:
            return await self._deposit_fault(verified, _fault_of(exc, verified), exc)
        deposit_tx = bytes(receipt["transactionHash"])
        if hooks is not None and step.envelope is not None and requirements is not None:
            answer = Answer(SettlementExtra(escrow_id=escrow_id, deadline=verified.terms.deadline, state=State.HELD),
                            deposit_tx)  # fmt: skip
            settle = answer.settle_response(verified.buyer, self.config.network)
            # Bookkeeping must not cost the buyer the sale it has paid for: a hook that raises is logged.
            await hooks.after_settled(step.envelope, requirements, settle, escrow_id, context=context)
        return Serve(verified, deposit_tx)

    async def _deposit_fault(self, verified: VerifiedPayment, fault: DepositFault, exc: Exception) -> Step:
        """Ask the chain what a failed deposit left (when it matters), then the machine what comes next."""
        state = await _blocking(self.chain.state_of, verified.escrow_id) if state_needed(fault) else None
        detail = exc.reason if isinstance(exc, TransactionFailed) else None
        step = after_deposit_fault(
            verified, fault, state, message=str(exc), detail=detail, reprice_after=self.config.reprice_after
        )
        if isinstance(step, Forget):
            await _blocking(self.store.forget, verified.escrow_id)  # the node refused it: nothing is on its way
            return step.then
        return step

    async def _resume(self, step: ResumeDeposit) -> Step | None:
        """The deposit sent by an earlier request, waited for again; None if it is gone (ask the chain anew)."""
        verified = step.verified
        try:
            receipt = await _blocking(self.chain.resume, step.tx_hash)
        except TransactionTimeout as exc:
            return await self._deposit_fault(verified, _fault_of(exc, verified), exc)
        except TransactionFailed as exc:
            after = await self._deposit_fault(verified, _fault_of(exc, verified), exc)
            return None if isinstance(after, Serve) else after  # landed by another deposit: judged anew
        if receipt is None:
            return None
        return Serve(verified, bytes(receipt["transactionHash"]))

    # -- serve-first (DESIGN.md section 8) ---------------------------------------------------

    async def _serve_first(
        self, step: ServeFirst, request: PaidRequest, mode: RouteMode, onchain: OnchainFacts | None = None
    ) -> Step:
        """Check on chain as hold checks before its deposit (balance, authorization unused, an eth_call of the
        pull: here the settlement's own); then reserve the exposure and record the payment in one store
        transaction, so concurrent requests and replicas cannot overshoot a limit."""
        verified, chain, config = step.verified, self.chain, self.config
        escrow_id, terms = verified.escrow_id, verified.terms
        facts = onchain if onchain is not None and onchain.serve_first else None
        if facts is None:  # not read with the first look (a payment that fell back from hold, or read again)
            facts = await _blocking(read_onchain, verified, chain=chain, serve_first=True)
        try:
            judge_onchain(verified, facts)
        except Refusal as rejected:
            log.warning("serve-first of 0x%s refused: %s (buyer %s)", escrow_id.hex(), rejected, verified.buyer)
            raise
        if config.hooks is not None and step.envelope is not None:
            # Serve-first's verification is these checks of the pull: the after-verify hooks see it passed.
            result = verify_result_context(step.envelope, request.offer.to_model(), request.context, verified.buyer)
            await abort_on(config.hooks.after_verify, result)
        refused = await _blocking(
            self.store.begin_serve_first,
            escrow_id,
            terms,
            accepted_at=step.now,
            route=_route_name(request.route),
            payload=step.record,
            due=step.due,
            # Both set whenever a route is serve-first (SellerConfig checks it).
            max_per_buyer=config.serve_first_max_per_buyer or 0,
            max_total=config.serve_first_max_total or 0,
        )
        outcome = Reserve.DONE if refused is None else refused
        per_buyer, total = config.serve_first_max_per_buyer or 0, config.serve_first_max_total or 0
        after = after_reserve(step, outcome, mode, per_buyer=per_buyer, total=total)
        if isinstance(after, Deposit):
            log.info("payment 0x%s served in hold mode: %s", escrow_id.hex(), outcome)
        return after

    # -- the handler, and storing its answer ----------------------------------------------

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: PaidRequest,
        *,
        verified: VerifiedPayment,
        deposit_tx: bytes | None,
        claim: Claim | None = None,
        serve_first: bool = False,
        envelope: PaymentPayload | None = None,
    ) -> None:
        """Run the handler; store its response with the delivery (hold) or settlement (serve-first) queued,
        in one transaction that also gives up the claim, then answer. A failed handler is refunded (hold)
        or costs nobody anything (serve-first: the record is dropped, no transaction is sent). Serve-first's
        settlement is the seller's before-settle hooks' to decline (`envelope`: the buyer's, for them)."""
        escrow_id, terms, store = verified.escrow_id, verified.payload.terms, self.store
        if not await self._still_held(claim):  # this run stalled past its lease and was taken over
            await self._answer_of_another(send, escrow_id)
            return
        response = await run_handler(self.app, scope, receive, request.body)
        if serve_first and response.status < 400 and envelope is not None:
            declined = await self._before_settle_first(request, envelope, escrow_id, claim)
            if declined is not None:
                await self._decline(send, request, verified, declined, claim)
                return
        save: functools.partial[bool]  # given the claim to release (release=) by _answer_once
        if response.status < 400:
            keep = kept(verified, response.body, deposit_tx, serve_first=serve_first)
            if serve_first:
                save = functools.partial(store.save_served_first, escrow_id, response, keep.delivery_hash)
            else:
                save = functools.partial(
                    store.save_served, escrow_id, terms, response, keep.delivery_hash, deposit_tx=deposit_tx
                )
            settle = self._settlement(terms.buyer, keep.answer)
            await self._answer_once(send, claim, escrow_id=escrow_id, save=save, response=response, settle=settle)
            return
        if serve_first:
            answer = handler_failed(escrow_id, terms, None, None, serve_first=True)
            save = functools.partial(store.forget_serve_first, escrow_id)
            settle = self._settlement(terms.buyer, answer)
            await self._answer_once(send, claim, escrow_id=escrow_id, save=save, response=response, settle=settle)
            return
        if not await self._still_held(claim):  # a refund now could undo the answer of the run that took over
            await self._answer_of_another(send, escrow_id)
            return
        refund_tx: bytes | None = None
        try:
            receipt = await _blocking(self.chain.refund, terms)
            refund_tx = bytes(receipt["transactionHash"])
            log_sale(
                Sale.REFUNDED,
                escrow_id,
                terms,
                route=_route_name(request.route),
                deposit_tx=deposit_tx,
                refund_tx=refund_tx,
                status=str(response.status),
            )
        except (EscrowError, OSError, TimeoutError) as exc:
            # The poster retries it; failing that, the keeper refunds after the deadline.
            log.warning("refund of 0x%s failed: %s", escrow_id.hex(), exc)
        answer = handler_failed(escrow_id, terms, deposit_tx, refund_tx, serve_first=False)
        save = functools.partial(store.save_failed, escrow_id, response, refund_tx, deposit_tx=deposit_tx)
        settle = self._settlement(terms.buyer, answer)
        await self._answer_once(send, claim, escrow_id=escrow_id, save=save, response=response, settle=settle)

    async def _answer_once(
        self,
        send: Send,
        claim: Claim | None,
        *,
        escrow_id: bytes,
        save: functools.partial[bool],
        response: StoredResponse,
        settle: str,
    ) -> None:
        """Store this run's answer (_store_once), then send it, or else the answer of the run that has the payment."""
        if not await self._store_once(claim, save):
            await self._answer_of_another(send, escrow_id)
            return
        await send_response(send, response, settle)

    async def _store_once(self, claim: Claim | None, save: functools.partial[bool]) -> bool:
        """Run the store write `save` that answers the payment, given the claim to release in its own transaction;
        False if it wrote nothing: another response was stored first, or the claim was lost (taken over)."""
        release = claim.hand_over() if claim is not None else None
        saved = await _blocking(save, release=release)
        if claim is not None:
            claim.released = True
        return saved

    async def _before_settle_first(
        self, request: PaidRequest, envelope: PaymentPayload, escrow_id: bytes, claim: Claim | None
    ) -> str | None:
        """A serve-first payment's before-settle hooks, after its handler succeeded and before its settlement is
        queued (phase "after-handler"): the reason one declined it, or None. A hook that raises decides nothing:
        the record is dropped as for a failed handler (nothing served, nothing owed) and the buyer gets 503."""
        hooks = self.config.hooks
        if hooks is None or not hooks.before_settle:
            return None
        context = settle_context(envelope, request.offer.to_model(), request.context, phase="after-handler")
        try:
            aborted = await SellerHooks.run(hooks.before_settle, context)
        except Exception:
            log.exception("a before-settle hook raised for serve-first 0x%s; not served, not charged", escrow_id.hex())
            # Dropped with the claim given up in the same transaction (nothing, if another run took it over).
            await self._store_once(claim, functools.partial(self.store.forget_serve_first, escrow_id))
            raise SellerUnavailable(Reason.SELLER_HOOK_FAILED, HOOK_FAILED, HOOK_RETRY_AFTER) from None
        return None if aborted is None else aborted.reason

    async def _decline(
        self, send: Send, request: PaidRequest, verified: VerifiedPayment, reason: str, claim: Claim | None
    ) -> None:
        """The seller declined to collect a served-first payment: recorded (exposure freed, nothing queued, the
        claim given up in the same transaction), and answered as the SDK answers a settlement its hook
        aborted: 402 with the hook's reason, the handler's response withheld. A replay gets the same 402."""
        escrow_id = verified.escrow_id
        if not await self._store_once(claim, functools.partial(self.store.decline_serve_first, escrow_id, reason)):
            await self._answer_of_another(send, escrow_id)
            return
        log_sale(Sale.DECLINED, escrow_id, verified.terms, route=_route_name(request.route), reason=reason)
        await self._send_required(send, request, 402, reason)

    async def _still_held(self, claim: Claim | None) -> bool:
        """Renew the claim now, before what must not run twice; False if another run took it over."""
        if claim is None or self._heartbeat.fresh(claim):
            return True
        return await _blocking(self._heartbeat.confirm, claim)

    # -- another run's answer, and the replay ------------------------------------------------

    async def _answer_of_another(self, send: Send, escrow_id: bytes) -> None:
        """This run lost the payment (its claim lapsed and was taken over, or another response was stored
        first): the answer is the other run's stored response, waited for up to `claim_wait` seconds, else
        503 payment_in_progress, as for any copy of a payment being handled. Never this run's own bytes."""
        log.error("payment 0x%s is another run's now (this one's claim lapsed); serving its answer", escrow_id.hex())
        give_up, pause = time.monotonic() + self.config.claim_wait, 0.02
        while True:
            payment = await _blocking(self.store.payment, escrow_id)
            if payment is not None and payment.response is not None:
                await self._replay(send, payment, payment.response)
                return
            if time.monotonic() > give_up:
                raise SellerUnavailable(IN_PROGRESS.reason, IN_PROGRESS.public, IN_PROGRESS.retry_after)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def _replay(self, send: Send, payment: Payment, response: StoredResponse) -> None:
        """The stored bytes again, with where their delivery or settlement stands."""
        escrow_id, store = payment.escrow_id, self.store
        delivery = settlement = None
        onchain: State | None = None
        if payment.serve_first:
            settlement = await _blocking(store.settlement, escrow_id)
        elif payment.status not in (PaymentStatus.REFUNDED, PaymentStatus.REFUND_PENDING):
            delivery = await _blocking(store.delivery, escrow_id)
            if needs_chain_state_for_replay(payment, delivery):
                onchain = await self._expired_state(escrow_id)
        answer = replayed(payment, delivery=delivery, settlement=settlement, onchain=onchain)
        await send_response(send, response, self._settlement(payment.terms.buyer, answer))

    async def _expired_state(self, escrow_id: bytes) -> State | None:
        """The escrow's state for a replay whose delivery expired (it stays Held until the buyer's refund);
        None if the chain cannot answer: the stored reply still goes, saying held."""
        try:
            return await _blocking(self.chain.state_of, escrow_id)
        except (EscrowError, OSError) as exc:
            log.warning("replay of 0x%s: escrow state unknown (%s); answered held", escrow_id.hex(), exc)
            return None

    # -- the 402 and the PAYMENT-RESPONSE header ---------------------------------------------

    def _settlement(self, payer: str, answer: Answer) -> str:
        """The PAYMENT-RESPONSE header of `answer`."""
        return answer.header(payer, self.config.network)

    async def _send_required(self, send: Send, request: PaidRequest, status: int, reason: str | None) -> None:
        model = payment_required(
            request.url,
            request.accepts,
            description=request.route.description or None,
            mime_type=request.route.mime_type,
            error=reason,
        )
        model.extensions = request.extensions
        body = json.dumps(model.model_dump(by_alias=True, exclude_none=True), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (PAYMENT_REQUIRED_HEADER.encode(), encode_payment_required(model).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _fault_of(exc: Exception, verified: VerifiedPayment) -> DepositFault:
    """What a failed deposit's exception means for the payment (logged here, once)."""
    escrow_id = verified.escrow_id.hex()
    if isinstance(exc, TransactionTimeout):
        log.warning("deposit of 0x%s not confirmed in time, answered 503: %s", escrow_id, exc)
        return DepositFault.PENDING
    if isinstance(exc, TransactionFailed):
        log.warning("deposit of 0x%s reverted on chain: %s (buyer %s)", escrow_id, exc, verified.buyer)
        return DepositFault.REVERTED
    if isinstance(exc, InsufficientFunds):
        log.error("operator %s cannot pay gas; deposit of 0x%s not sent: %s", exc.address, escrow_id, exc)
        return DepositFault.UNFUNDED
    if isinstance(exc, NonceConflict):
        log.error("operator nonce taken twice; deposit of 0x%s not sent: %s", escrow_id, exc)
        return DepositFault.NONCE
    log.warning("deposit of 0x%s failed: %s", escrow_id, exc)
    return DepositFault.UNKNOWN


def _route_name(route: PricedRoute) -> str:
    return f"{route.method} {route.path}"


__all__ = ["EscrowMiddleware"]
