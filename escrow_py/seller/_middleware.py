"""The seller's pure ASGI middleware: 402, verify, deposit, serve, store, queue the delivery, refund on failure."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from starlette.routing import BaseRoute, Host, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from web3 import Web3
from x402.http import HTTPRequestContext
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from escrow_py.chain import rpc
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.tx import SentTx
from escrow_py.protocol.errors import (
    ConfigError,
    EscrowError,
    InsufficientFunds,
    NonceConflict,
    ProtocolError,
    TransactionFailed,
    TransactionTimeout,
)
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms, canonical_url, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    UNAVAILABLE_STATUS,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    SettlementStatus,
    Unavailable,
    decode_payment_signature,
    encode_payment_required,
    encode_payment_response,
    payment_required,
)
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._offers import (
    EXACT,
    Offers,
    SellerHooks,
    request_context,
    settle_context,
    settle_result_context,
    verify_context,
    verify_result_context,
)
from escrow_py.seller._poster import DeliveryPoster, log_sale
from escrow_py.seller._startup import check_chain
from escrow_py.seller._store import (
    DEPOSITING,
    EXPIRED,
    POSTED,
    REFUND_PENDING,
    REFUNDED,
    REFUNDED_ON_CHAIN,
    SETTLE_DONE,
    SETTLE_LOST,
    SETTLED_ELSEWHERE,
    Payment,
    SellerStore,
    StoredResponse,
)
from escrow_py.seller._verify import Refusal, VerifiedPayment, offer_for, verify_offchain, verify_onchain

log = logging.getLogger("escrow_py.seller")

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Seconds a client should wait before sending the payment again after a 503 chain_unavailable.
CHAIN_RETRY_AFTER = 2

# PAYMENT-RESPONSE `state` of a served payment by its delivery's status: what the chain says as far as
# the seller knows (pending and expired deliveries leave the escrow Held).
_DELIVERY_STATE = {POSTED: "released", SETTLED_ELSEWHERE: "released", REFUNDED_ON_CHAIN: "refunded"}

_SIGNATURE_HEADER = PAYMENT_SIGNATURE_HEADER.lower().encode()
_OWN_HEADERS = frozenset({PAYMENT_RESPONSE_HEADER.lower().encode(), b"cache-control"})


async def _blocking(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run web3 and SQLite calls in a worker thread: they block."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class SellerUnavailable(EscrowError):
    """The seller's own side cannot take the payment now (503 with Retry-After); the buyer is not at fault.

    `reason` is a Reason, `public` the message the client sees (never an exception's
    text: those can carry the RPC URL and its API key).
    """

    def __init__(self, reason: Reason, public: str, retry_after: int) -> None:
        super().__init__(f"{reason}: {public}")
        self.reason = reason
        self.public = public
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: str
    body: bytes
    route: PricedRoute
    offer: EscrowRequirements
    # The SDK's view of the request, and the 402's offers in the seller's order (_offers.py).
    context: HTTPRequestContext
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None


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
        route = self._priced_route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        await self._paid(scope, receive, send, route)

    def _priced_route(self, scope: Scope) -> PricedRoute | None:
        """The priced route this request reaches, whatever its method.

        A PricedRoute names a method, but frameworks send other methods to the same handler:
        Starlette's Route answers HEAD with the GET endpoint, FastAPI takes methods=["GET",
        "HEAD"], an api_route may take GET and POST. The rule: a request is priced if its own
        method is priced on its path, or if the app's router sends it to the same endpoint as
        a priced method on that path (then it pays that route's price). Without a router to
        ask (a bare ASGI app), HEAD is priced as GET, the way every server answers it.
        """
        method, path = str(scope["method"]).upper(), str(scope["path"])
        route = self.config.route_for(method, path)
        if route is not None:
            return route
        others = [r for r in self.config.routes if r.matches_path(path)]
        if not others:
            return None
        routes = _router_routes(scope, self.app)
        if routes is None:
            return next((r for r in others if r.method == "GET"), None) if method == "HEAD" else None
        reached = _endpoint(routes, scope)
        if reached is None:
            return None
        return next((r for r in others if _endpoint(routes, {**scope, "method": r.method}) is reached), None)

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def on_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.poster.stop()
            return message

        async def on_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                failure = await self._startup_failure()
                if failure is not None:
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                self.poster.start()
            await send(message)

        await self.app(scope, on_receive, on_send)

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
        body = await self._read_body(receive)
        if body is None:
            await _send_plain(send, 413, b"request body too large")
            return
        header = _header(scope, _SIGNATURE_HEADER)
        try:
            request = await self._request(scope, body, route, header)
        except ConfigError as exc:  # a dynamic price or payTo gave something unusable: the seller's bug
            log.error("route %s: %s", _route_name(route), exc)
            await _send_plain(send, 500, b"the seller's price for this route is misconfigured")
            return
        if header is None:
            await self._send_required(send, request, 402, None)
            return
        other = _other_scheme(header)
        if other is not None:
            await self._pay_exact(scope, receive, send, request, other)
            return
        try:
            escrow_id = self._escrow_id_of(header)
            async with self._claim(escrow_id):
                await self._settle(scope, receive, send, request, header=header, escrow_id=escrow_id)
        except Refusal as rejected:
            await self._send_required(send, request, rejected.status, rejected.error)
        except SellerUnavailable as unavailable:
            await _send_unavailable(send, unavailable)
        except (EscrowError, OSError) as exc:
            # The chain or the store failed, not the buyer: nothing was served, a retry or replay is safe.
            log.warning("paid request %s %s failed: %s", request.method, request.route.path, exc)
            down = SellerUnavailable(Reason.CHAIN_UNAVAILABLE, "the chain node failed", CHAIN_RETRY_AFTER)
            await _send_unavailable(send, down)

    @contextlib.asynccontextmanager
    async def _claim(self, escrow_id: bytes) -> AsyncIterator[None]:
        """Hold the payment's claim in the store while it is handled: one request, in one replica, at a time.

        The claim is a lease row in the database, so it holds across processes and hosts. A
        copy of a payment another request holds waits for that one's stored answer (and replays
        it) for up to `claim_wait` seconds, then gets 503 payment_in_progress. The holder renews
        the claim while it works; if it dies, the claim expires after `claim_seconds` and the next
        copy takes the payment over where the store says it stopped. An answered payment needs
        no claim: its replay only reads.
        """
        store, config = self.store, self.config
        if await _blocking(store.answered, escrow_id):
            yield
            return
        name = f"payment:0x{escrow_id.hex()}"
        owner = f"{self.replica}:{secrets.token_hex(4)}"
        give_up = time.monotonic() + config.claim_wait
        pause = 0.02
        while not await _blocking(store.take_lease, name, owner, config.claim_seconds):
            if await _blocking(store.answered, escrow_id):
                yield  # the holder answered meanwhile: _settle replays its stored response
                return
            if time.monotonic() > give_up:
                raise SellerUnavailable(Reason.PAYMENT_IN_PROGRESS, "this payment is being processed; send it again", 1)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        renewal = asyncio.get_running_loop().create_task(self._renew(name, owner))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            # Shielded: a request cancelled by its client still hands the payment on at once.
            with anyio.CancelScope(shield=True), contextlib.suppress(EscrowError, OSError):
                await _blocking(store.release_lease, name, owner)

    async def _renew(self, name: str, owner: str) -> None:
        """Keep the claim while the request runs (a deposit or handler may outlast one lease)."""
        seconds = self.config.claim_seconds
        while True:
            await asyncio.sleep(seconds / 3)
            try:
                held = await _blocking(self.store.take_lease, name, owner, seconds)
            except (EscrowError, OSError) as exc:
                log.warning("claim %s not renewed: %s", name, exc)
                continue
            if not held:
                # Someone took it over (this replica stalled past the lease). The store still keeps one
                # answer: whichever response is stored first is the one every replica serves.
                log.error("claim %s lost to another replica while handling it", name)
                return

    def _escrow_id_of(self, header: str) -> bytes:
        """The id the payment claims (it is verified before anything is done with it)."""
        try:
            payload = EscrowPayload.from_json(decode_payment_signature(header).payload)
        except ProtocolError as exc:
            raise Refusal(exc.reason, str(exc)) from None
        return payload.terms.escrow_id(self.config.chain_id, self.config.escrow)

    def _verify(self, header: str, request: _Request, chain_time: int) -> VerifiedPayment:
        return verify_offchain(
            header,
            request.offer,
            chain_time=chain_time,
            min_time_left=self.config.min_time_left,
            deadline_slack=self.config.deadline_slack,
        )

    async def _settle(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, *, header: str, escrow_id: bytes
    ) -> None:
        payment = await _blocking(self.store.payment, escrow_id)
        if payment is not None:
            # Verified again as it was when accepted: same request, same terms, same signature (and the
            # price and payTo of then: a dynamic price may have moved since).
            request = _as_accepted(request, payment.terms)
            verified = self._verify(header, request, payment.accepted_at)
            if payment.response is not None:
                await self._replay(send, payment, payment.response)
                return
            if payment.serve_first:
                await self._serve_first_again(scope, receive, send, request, verified)
                return
            deposit_tx = payment.deposit_tx
            state = await _blocking(self.chain.state_of, escrow_id)
            if state == State.NONE and payment.status == DEPOSITING and payment.deposit_tx is not None:
                # Sent earlier and not confirmed then (503 deposit_pending): wait for that one, don't send another.
                resumed = await self._resume(verified, payment.deposit_tx)
                if resumed is not None:
                    state, deposit_tx = State.HELD, resumed
                else:  # gone from the node, or reverted because another deposit of it landed first
                    state = await _blocking(self.chain.state_of, escrow_id)
            if state == State.NONE:
                # Recorded, but the deposit never landed: try it again under today's rules.
                now = await _blocking(self.chain.next_block_time)
                verified = self._verify(header, request, now)
                deposit_tx = await self._deposit(verified, accepted_at=None, route=request.route)
            elif state == State.HELD:
                await self._require_time_left(verified.terms)  # a crash mid-handler: serve it now
            else:
                raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} is {state.name}")
        else:
            first = await self._first_time(scope, receive, send, request, header=header, escrow_id=escrow_id)
            if first is None:
                return
            verified, deposit_tx = first
        await self._serve(scope, receive, send, request, verified=verified, deposit_tx=deposit_tx)

    async def _first_time(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, *, header: str, escrow_id: bytes
    ) -> tuple[VerifiedPayment, bytes | None] | None:
        """A payment this store has never seen: deposited (hold), or served first and answered (None).

        The seller's hooks run around verify and the deposit (hold); a serve-first sale runs none.
        """
        state, now = await _blocking(self._state_and_time, escrow_id)
        if state == State.NONE:
            if request.route.serve_first:
                verified = self._verify(header, request, now)
                if await self._serve_first(scope, receive, send, request, verified=verified, now=now):
                    return None
            return await self._accept_new(header, request, now)
        if state == State.HELD:
            # Deposited by someone else (the buyer, another replica) and never answered here. The
            # token checked the signature on deposit; judge the rest at a time the deadline was valid.
            reference = min(now, self._latest_valid_time(request, header))
            verified = self._verify(header, request, reference)
            payload = json.dumps(verified.payload.to_json())
            await _blocking(
                self.store.begin_deposit, escrow_id, verified.terms, reference, _route_name(request.route), payload
            )
            await _blocking(self.store.set_held, escrow_id, None)
            await self._require_time_left(verified.terms)
            return verified, None
        raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} is {state.name}")

    async def _accept_new(self, header: str, request: _Request, now: int) -> tuple[VerifiedPayment, bytes | None]:
        """A payment seen for the first time: verified and deposited, between the seller's hooks."""
        hooks = self.config.hooks
        if hooks is None:
            verified = self._verify(header, request, now)
            return verified, await self._deposit(verified, accepted_at=now, route=request.route)
        try:
            payload = decode_payment_signature(header)
        except ProtocolError:
            payload = None  # _verify names what is wrong with it
        requirements, context = request.offer.to_model(), request.context
        if payload is not None:
            await _abort_on(hooks.before_verify, verify_context(payload, requirements, context))
        verified = self._verify(header, request, now)
        assert payload is not None
        await _abort_on(hooks.after_verify, verify_result_context(payload, requirements, context, verified.buyer))
        await _abort_on(hooks.before_settle, settle_context(payload, requirements, context))
        deposit_tx = await self._deposit(verified, accepted_at=now, route=request.route)
        extra = SettlementExtra(escrow_id=verified.escrow_id, deadline=verified.terms.deadline, state=State.HELD)
        result = self._settlement(verified.buyer, deposit_tx, extra)
        try:
            await SellerHooks.run(hooks.after_settle, settle_result_context(payload, requirements, context, result))
        except Exception:  # bookkeeping must not cost the buyer the sale it has paid for
            log.exception("an after-settle hook raised for escrow 0x%s; serving it anyway", verified.escrow_id.hex())
        return verified, deposit_tx

    async def _pay_exact(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, payload: PaymentPayload
    ) -> None:
        """A payment in the SDK's `exact` scheme: verified and settled through the SDK (_offers.Offers.pay_exact)."""
        outcome = await self.offers.pay_exact(
            payload, request.accepts, request.context, lambda: self._run_handler(scope, receive, request.body)
        )
        if outcome.unavailable:
            down = SellerUnavailable(Reason.CHAIN_UNAVAILABLE, "the payment facilitator failed", CHAIN_RETRY_AFTER)
            await _send_unavailable(send, down)
        elif outcome.response is None:
            await self._send_required(send, request, 402, outcome.error)
        else:  # no settlement when the handler failed: not charged
            await self._send_response(send, outcome.response, outcome.settle)

    def _state_and_time(self, escrow_id: bytes) -> tuple[State, int]:
        return rpc.both(lambda: self.chain.state_of(escrow_id), self.chain.next_block_time)

    def _latest_valid_time(self, request: _Request, header: str) -> int:
        """The last chain time at which this payment's deadline and authorization both had time left."""
        payload = EscrowPayload.from_json(decode_payment_signature(header).payload)
        return min(payload.terms.deadline, payload.authorization.valid_before) - self.config.min_time_left - 1

    async def _require_time_left(self, terms: Terms) -> None:
        now = await _blocking(self.chain.next_block_time)
        if now + self.config.min_time_left > terms.deadline:
            raise Refusal(
                Reason.ESCROW_REFUNDABLE,
                f"deadline {terms.deadline} is less than {self.config.min_time_left}s after chain time {now}: "
                "too late to deliver, the escrow is refundable",
            )

    async def _deposit(self, verified: VerifiedPayment, *, accepted_at: int | None, route: PricedRoute) -> bytes | None:
        """Check on chain, record, deposit, wait for the receipt. `accepted_at` None: already recorded.

        The buyer's faults are 402s (a simulation or a mined deposit that reverts, with the
        revert in `error`); the seller's own are 503s with a reason (SellerUnavailable): the
        operator cannot pay gas, its nonce is taken, the deposit is not confirmed in time.
        """
        escrow_id = verified.escrow_id
        chain = self.chain
        try:
            gas = await _blocking(verify_onchain, verified, chain=chain)
        except Refusal as rejected:
            if rejected.reason == Reason.SIMULATION_FAILED:
                log.warning("deposit of 0x%s refused: %s (buyer %s)", escrow_id.hex(), rejected, verified.buyer)
            raise
        payload = json.dumps(verified.payload.to_json())
        if accepted_at is not None and not await _blocking(
            self.store.begin_deposit, escrow_id, verified.terms, accepted_at, _route_name(route), payload
        ):
            raise SellerUnavailable(Reason.PAYMENT_IN_PROGRESS, "this payment is being processed; send it again", 1)

        def record(signed: SentTx) -> None:
            # Before the transaction leaves: a retry finds it, and never sends a second deposit beside it.
            self.store.set_deposit_sent(escrow_id, signed.tx_hash)

        try:
            receipt = await _blocking(chain.deposit, verified.payload, gas=gas, on_signed=record)
        except TransactionTimeout as exc:
            raise self._pending(escrow_id, exc) from None
        except TransactionFailed as exc:
            return await self._deposit_reverted(verified, exc)
        except (InsufficientFunds, NonceConflict) as exc:
            await _blocking(self.store.forget, escrow_id)  # the node refused it: nothing is on its way
            raise self._operator_failure(escrow_id, exc) from None
        except (EscrowError, OSError) as exc:
            if await _blocking(chain.state_of, escrow_id) == State.HELD:
                # It landed although we saw an error (a lost receipt): go on as deposited.
                await _blocking(self.store.set_held, escrow_id, None)
                return None
            await _blocking(self.store.forget, escrow_id)
            log.warning("deposit of 0x%s failed: %s", escrow_id.hex(), exc)
            raise SellerUnavailable(
                Reason.CHAIN_UNAVAILABLE, "the deposit could not be sent", CHAIN_RETRY_AFTER
            ) from None
        tx_hash = bytes(receipt["transactionHash"])
        await _blocking(self.store.set_held, escrow_id, tx_hash)
        return tx_hash

    async def _resume(self, verified: VerifiedPayment, tx_hash: bytes) -> bytes | None:
        """The deposit sent by an earlier request, waited for again; None if it is gone (send a new one)."""
        escrow_id = verified.escrow_id
        try:
            receipt = await _blocking(self.chain.resume, tx_hash)
        except TransactionTimeout as exc:
            raise self._pending(escrow_id, exc) from None
        except TransactionFailed as exc:
            await self._deposit_reverted(verified, exc)
            return None
        if receipt is None:
            return None
        mined = bytes(receipt["transactionHash"])
        await _blocking(self.store.set_held, escrow_id, mined)
        return mined

    def _pending(self, escrow_id: bytes, exc: TransactionTimeout) -> SellerUnavailable:
        log.warning("deposit of 0x%s not confirmed in time, answered 503: %s", escrow_id.hex(), exc)
        return SellerUnavailable(
            Reason.DEPOSIT_PENDING,
            "the deposit was sent and is not confirmed yet; send the same payment again",
            max(1, math.ceil(self.config.reprice_after)),
        )

    def _operator_failure(self, escrow_id: bytes, exc: InsufficientFunds | NonceConflict) -> SellerUnavailable:
        if isinstance(exc, InsufficientFunds):
            log.error("operator %s cannot pay gas; deposit of 0x%s not sent: %s", exc.address, escrow_id.hex(), exc)
            return SellerUnavailable(Reason.OPERATOR_UNFUNDED, "the seller cannot pay for gas now", 30)
        log.error("operator nonce taken twice; deposit of 0x%s not sent: %s", escrow_id.hex(), exc)
        return SellerUnavailable(Reason.NONCE_CONFLICT, "the seller's transaction key is busy", 1)

    async def _deposit_reverted(self, verified: VerifiedPayment, exc: TransactionFailed) -> bytes | None:
        """A mined deposit that reverted: the buyer's payment failed at the token or the escrow."""
        escrow_id = verified.escrow_id
        if await _blocking(self.chain.state_of, escrow_id) == State.HELD:
            await _blocking(self.store.set_held, escrow_id, None)  # deposited by another transaction meanwhile
            return None
        await _blocking(self.store.forget, escrow_id)
        log.warning("deposit of 0x%s reverted on chain: %s (buyer %s)", escrow_id.hex(), exc, verified.buyer)
        raise Refusal(Reason.DEPOSIT_FAILED, str(exc), detail=exc.reason) from None

    # -- serve-first (DESIGN.md section 8) ---------------------------------------------------

    async def _serve_first(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, *, verified: VerifiedPayment, now: int
    ) -> bool:
        """Serve a payment before any money moves, if the exposure limits allow; False: serve it in hold mode.

        Checked first as hold checks before its deposit (balance, authorization unused, an eth_call of
        the pull: here the settlement's own); then the exposure is reserved and the payment recorded
        in one store transaction, so concurrent requests and replicas cannot overshoot a limit.
        """
        escrow_id, terms, chain, config = verified.escrow_id, verified.terms, self.chain, self.config
        try:
            await _blocking(verify_onchain, verified, chain=chain, serve_first=True)
        except Refusal as rejected:
            log.warning("serve-first of 0x%s refused: %s (buyer %s)", escrow_id.hex(), rejected, verified.buyer)
            raise
        due = min(verified.payload.authorization.valid_before, terms.deadline)
        refused = await _blocking(
            self.store.begin_serve_first,
            escrow_id,
            terms,
            accepted_at=now,
            route=_route_name(request.route),
            payload=json.dumps(verified.payload.to_json()),
            due=due,
            # Both set whenever a route is serve-first (SellerConfig checks it).
            max_per_buyer=config.serve_first_max_per_buyer or 0,
            max_total=config.serve_first_max_total or 0,
        )
        if refused == "known":
            raise SellerUnavailable(Reason.PAYMENT_IN_PROGRESS, "this payment is being processed; send it again", 1)
        if refused is not None:
            reason = Reason(refused)
            why = (
                f"buyer {terms.buyer} left a serve-first settlement unpaid"
                if reason == Reason.SERVE_FIRST_REFUSED
                else f"serving {terms.amount} first would pass an exposure limit (per buyer "
                f"{config.serve_first_max_per_buyer}, total {config.serve_first_max_total})"
            )
            if request.route.fallback_to_hold:
                log.info("payment 0x%s served in hold mode: %s (%s)", escrow_id.hex(), why, reason)
                return False
            raise Refusal(reason, why)
        await self._serve_first_handler(scope, receive, send, request, verified)
        return True

    async def _serve_first_again(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, verified: VerifiedPayment
    ) -> None:
        """A serve-first payment recorded and never answered (the seller died mid-handler): serve it now,
        if its authorization is still unused and leaves the poster time to settle it."""
        terms, escrow_id = verified.terms, verified.escrow_id
        if await _blocking(self.chain.authorization_used, terms.token, terms.buyer, escrow_id):
            raise Refusal(Reason.AUTHORIZATION_USED, "the authorization was already used or cancelled")
        now = await _blocking(self.chain.next_block_time)
        due = min(verified.payload.authorization.valid_before, terms.deadline)
        if now + self.config.min_time_left > due:
            raise Refusal(
                Reason.AUTHORIZATION_EXPIRED, f"validBefore/deadline {due} leaves no time to settle (chain time {now})"
            )
        await self._serve_first_handler(scope, receive, send, request, verified)

    async def _serve_first_handler(
        self, scope: Scope, receive: Receive, send: Send, request: _Request, verified: VerifiedPayment
    ) -> None:
        """Run the handler; store the response and queue its settlement durably, then answer `pending`.

        A failed handler costs nobody anything: the record is dropped, no transaction is sent.
        """
        escrow_id, terms = verified.escrow_id, verified.terms
        response = await self._run_handler(scope, receive, request.body)
        if response.status >= 400:
            await _blocking(self.store.forget_serve_first, escrow_id)
            extra = SettlementExtra(escrow_id=escrow_id, deadline=terms.deadline)
            settle = self._settlement(terms.buyer, None, extra, error=Reason.HANDLER_FAILED_NOT_CHARGED)
            await self._send_response(send, response, settle)
            return
        hashed = delivery_hash(response.body)
        if not await _blocking(self.store.save_served_first, escrow_id, response, hashed):
            await self._replay_stored(send, escrow_id)
            return
        extra = SettlementExtra(
            escrow_id=escrow_id, deadline=terms.deadline, delivery_hash=hashed, settlement=SettlementStatus.PENDING
        )
        await self._send_response(send, response, self._settlement(terms.buyer, None, extra))

    async def _replay_served_first(self, send: Send, payment: Payment, response: StoredResponse) -> None:
        """The stored bytes again, with where their settlement stands."""
        record = await _blocking(self.store.settlement, payment.escrow_id)
        settled = record is not None and record.status == SETTLE_DONE
        lost = record is not None and record.status == SETTLE_LOST
        extra = SettlementExtra(
            escrow_id=payment.escrow_id,
            deadline=payment.terms.deadline,
            delivery_hash=delivery_hash(response.body),
            settlement=None if lost else SettlementStatus.SETTLED if settled else SettlementStatus.PENDING,
        )
        tx = record.tx_hash if record is not None and settled else None
        error = Reason.SETTLEMENT_FAILED if lost else None
        await self._send_response(send, response, self._settlement(payment.terms.buyer, tx, extra, error=error))

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: _Request,
        *,
        verified: VerifiedPayment,
        deposit_tx: bytes | None,
    ) -> None:
        escrow_id, terms = verified.escrow_id, verified.terms
        response = await self._run_handler(scope, receive, request.body)
        extra = SettlementExtra(escrow_id=escrow_id, deadline=terms.deadline)
        if response.status < 400:
            hashed = delivery_hash(response.body)
            if not await _blocking(self.store.save_served, escrow_id, terms, response, hashed):
                await self._replay_stored(send, escrow_id)
                return
            extra = SettlementExtra(
                escrow_id=escrow_id,
                deadline=terms.deadline,
                delivery_hash=hashed,
                state=State.HELD,
                settlement=SettlementStatus.HELD,
            )
            await self._send_response(send, response, self._settlement(terms.buyer, deposit_tx, extra))
            return
        refund_tx: bytes | None = None
        try:
            receipt = await _blocking(self.chain.refund, terms)
            refund_tx = bytes(receipt["transactionHash"])
            log_sale(
                "refunded",
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
        if not await _blocking(self.store.save_failed, escrow_id, response, refund_tx):
            await self._replay_stored(send, escrow_id)
            return
        extra = SettlementExtra(
            escrow_id=escrow_id,
            deadline=terms.deadline,
            refund_transaction=refund_tx,
            state=State.REFUNDED if refund_tx else State.HELD,
        )
        settle = self._settlement(terms.buyer, deposit_tx, extra, error=Reason.HANDLER_FAILED_REFUNDED)
        await self._send_response(send, response, settle)

    async def _replay_stored(self, send: Send, escrow_id: bytes) -> None:
        """Another run's response was stored first (this one's claim had lapsed): that one is the answer."""
        log.error("payment 0x%s was answered by another replica meanwhile; serving its response", escrow_id.hex())
        payment = await _blocking(self.store.payment, escrow_id)
        if payment is None or payment.response is None:  # save_* found one stored: it cannot have vanished
            raise EscrowError(f"payment 0x{escrow_id.hex()}: no stored response after a refused save")
        await self._replay(send, payment, payment.response)

    async def _replay(self, send: Send, payment: Payment, response: StoredResponse) -> None:
        terms = payment.terms
        if payment.serve_first:
            await self._replay_served_first(send, payment, response)
            return
        if payment.status in (REFUNDED, REFUND_PENDING):
            extra = SettlementExtra(
                escrow_id=payment.escrow_id,
                deadline=terms.deadline,
                refund_transaction=payment.refund_tx,
                state=State.REFUNDED if payment.status == REFUNDED else State.HELD,
            )
            settle = self._settlement(terms.buyer, payment.deposit_tx, extra, error=Reason.HANDLER_FAILED_REFUNDED)
        else:
            record = await _blocking(self.store.delivery, payment.escrow_id)
            state = _DELIVERY_STATE.get(record.status, "held") if record is not None else "held"
            if record is not None and record.status == EXPIRED:
                state = await self._expired_state(payment.escrow_id)
            extra = SettlementExtra(
                escrow_id=payment.escrow_id,
                deadline=terms.deadline,
                delivery_hash=delivery_hash(response.body),
                delivery_transaction=record.tx_hash if record else None,
                state=state,
                settlement=SettlementStatus.HELD,
            )
            settle = self._settlement(terms.buyer, payment.deposit_tx, extra)
        await self._send_response(send, response, settle)

    async def _expired_state(self, escrow_id: bytes) -> str:
        """The PAYMENT-RESPONSE state of an escrow whose delivery expired: it stays Held until the buyer's
        refund (a keeper, recover()), so the chain is asked; if it cannot answer, the stored reply still goes."""
        try:
            onchain = await _blocking(self.chain.state_of, escrow_id)
        except (EscrowError, OSError) as exc:
            log.warning("replay of 0x%s: escrow state unknown (%s); answered held", escrow_id.hex(), exc)
            return "held"
        return {State.RELEASED: "released", State.REFUNDED: "refunded"}.get(onchain, "held")

    # -- the wrapped handler ---------------------------------------------------------------

    async def _run_handler(self, scope: Scope, receive: Receive, body: bytes) -> StoredResponse:
        """Run the app with the buffered body and capture its whole response; an exception is a 500."""
        delivered = False

        async def replay_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        try:
            await self.app(scope, replay_receive, capture)
        except Exception:
            log.exception("handler for %s %s raised", scope["method"], scope["path"])
            return StoredResponse(500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error")
        if status is None:
            return StoredResponse(500, [(b"content-type", b"text/plain; charset=utf-8")], b"no response")
        return StoredResponse(status, headers, b"".join(chunks))

    # -- building responses ----------------------------------------------------------------

    async def _request(self, scope: Scope, body: bytes, route: PricedRoute, header: str | None) -> _Request:
        method = str(scope["method"]).upper()
        url = self._resource_url(scope)
        config = self.config
        context = request_context(scope, url, route, header)
        amount, pay_to = await self.offers.terms_of(route, context)
        offer = offer_for(
            network=config.network,
            amount=amount,
            asset=config.token,
            pay_to=pay_to,
            escrow=config.escrow,
            operator=config.operator.address,
            token_name=config.token_name,
            token_version=config.token_version,
            max_timeout_seconds=route.max_timeout_seconds,
            method=method,
            resource_url=url,
            body=body,
            settlement=route.settlement,  # type: ignore[arg-type]  # PricedRoute made it a SettlementMode
        )
        accepts = await self.offers.accepts(route, offer.to_model(), amount, pay_to)
        return _Request(method, url, body, route, offer, context, accepts, self.offers.extensions(route, context))

    def _resource_url(self, scope: Scope) -> str:
        """The canonical URL of this request as it went over the wire (terms.canonical_url)."""
        root = str(scope.get("root_path", "")).encode("utf-8")
        # raw_path is the request target exactly as sent; `path` is already percent-decoded.
        target = scope.get("raw_path") or str(scope["path"]).encode("utf-8")
        if root and not target.startswith(root):
            target = root + target
        if self.config.public_base_url is not None:
            base = self.config.public_base_url.encode("utf-8")
        else:
            host = _header(scope, b"host")
            if host is None:
                server = scope.get("server") or ("localhost", None)
                host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
            base = f"{scope.get('scheme', 'http')}://{host}".encode("latin-1")
        query = bytes(scope.get("query_string", b""))
        return canonical_url(base + target + (b"?" + query if query else b""))

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _settlement(
        self, payer: str, deposit_tx: bytes | None, extra: SettlementExtra, *, error: str | None = None
    ) -> SettleResponse:
        return SettleResponse(
            # A serve-first handler failure: nothing was charged, and nothing will be.
            success=error not in {Reason.HANDLER_FAILED_NOT_CHARGED, Reason.SETTLEMENT_FAILED},
            transaction="0x" + deposit_tx.hex() if deposit_tx else "",
            network=self.config.network,
            payer=payer,
            error_reason=error,
            extra=extra.to_json(),
        )

    async def _send_required(self, send: Send, request: _Request, status: int, reason: str | None) -> None:
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

    async def _send_response(self, send: Send, response: StoredResponse, settle: SettleResponse | None) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() not in _OWN_HEADERS]
        headers.append((b"cache-control", b"no-store"))
        if settle is not None:  # None: an exact payment whose handler failed, not charged
            headers.append((PAYMENT_RESPONSE_HEADER.encode(), encode_payment_response(settle).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})


def _router_routes(scope: Scope, app: ASGIApp) -> list[BaseRoute] | None:
    """The routes of the Starlette/FastAPI router behind this middleware, if there is one."""
    candidates: list[Any] = [scope.get("app")]
    node: Any = app
    while node is not None:  # the middleware stack down to the router
        candidates.append(node)
        node = getattr(node, "app", None)
    for candidate in candidates:
        router = getattr(candidate, "router", candidate)
        routes = getattr(router, "routes", None)
        if isinstance(routes, list) and all(isinstance(r, BaseRoute) for r in routes):
            return routes
    return None


def _endpoint(routes: list[BaseRoute], scope: Scope) -> Any:
    """The endpoint the router would run for `scope` (None: no full match), looking into mounts."""
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            inner = getattr(route, "routes", None)
            if isinstance(route, (Mount, Host)) and inner:
                return _endpoint(list(inner), {**scope, **child})
            return child.get("endpoint", route)
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_plain(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_unavailable(send: Send, unavailable: SellerUnavailable) -> None:
    """503 with Retry-After: `{"error": reason, "message": ...}`; no new offer (the same payment is to be resent)."""
    body = Unavailable(unavailable.reason, unavailable.public, unavailable.retry_after).body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"retry-after", str(unavailable.retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": UNAVAILABLE_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _as_accepted(request: _Request, terms: Terms) -> _Request:
    """The request judged by the amount and payTo its stored payment was accepted at."""
    offer = request.offer
    if (offer.amount, offer.pay_to) == (terms.amount, terms.seller):
        return request
    return dataclasses.replace(request, offer=offer.with_(amount=terms.amount, pay_to=terms.seller))


def _other_scheme(header: str) -> PaymentPayload | None:
    """The payment if it is in the SDK's `exact` scheme (any other header goes the delivery-escrow way)."""
    try:
        payload = decode_payment_signature(header)
    except ProtocolError:
        return None
    return payload if payload.accepted.scheme == EXACT else None


async def _abort_on(hooks: list[Any], context: Any) -> None:
    """Run a seller's before/after-verify hooks; an AbortResult refuses the payment with its reason."""
    aborted = await SellerHooks.run(hooks, context)
    if aborted is not None:
        raise Refusal(aborted.reason, aborted.message or f"refused by the seller: {aborted.reason}")


def _route_name(route: PricedRoute) -> str:
    return f"{route.method} {route.path}"


__all__ = ["EscrowMiddleware"]
