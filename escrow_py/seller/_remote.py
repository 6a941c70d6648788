"""The seller in facilitator mode: no operator key, no RPC; a facilitator deposits, delivers and refunds.

    app.add_middleware(FacilitatorMiddleware, config=FacilitatorSellerConfig(
        facilitator_url="https://facilitator.example", api_key=os.environ["X402_ESCROW_FACILITATOR_KEY"],
        network="eip155:84532", token=USDC, pay_to=SELLER, routes=[PricedRoute(...)], store="seller.sqlite"))

It is EscrowMiddleware with another backend for the chain side: the 402, the request's
canonical URL and requestHash, the handler run, the stored response and the replay are
the same code. Where EscrowMiddleware deposits, this asks the facilitator's /settle (the
payment's escrow id is its idempotency key, so asking again is safe); the delivery hash
goes into the local store's queue in the same transaction as the response, and an outbox
loop hands queued hashes to the facilitator's /deliver in batches (a delivery row in
status `posted` here means "accepted by the facilitator"; it posts them on chain). A
failed handler is refunded through /refund, or queued for it.

A facilitator that is down, slow, or refuses the seller's own key answers 503
`facilitator_unavailable` with Retry-After, before the handler runs: a buyer is never
charged for a request that is not served. Deliveries and refunds queued while it is
down leave when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from eth_typing import ChecksumAddress
from starlette.types import ASGIApp, Receive, Scope, Send
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

from escrow_py.protocol.codec import parse_hex, setting_address
from escrow_py.protocol.errors import ConfigError, EscrowError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import delivery_hash
from escrow_py.protocol.tls import tls_context
from escrow_py.protocol.wire import SCHEME, SettlementStatus
from escrow_py.seller._asgi import lifespan, run_handler, send_response
from escrow_py.seller._claims import Claim
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._hooks import abort_on
from escrow_py.seller._machine import (
    Deposit,
    ParsedPayment,
    Reject,
    SellerUnavailable,
    Serve,
    ServeFirst,
    Unavailable,
    _as_accepted,
    after_reserve,
    declined,
    handler_failed,
    kept,
    served,
    settle_due,
)
from escrow_py.seller._middleware import EscrowMiddleware, _blocking, _route_name
from escrow_py.seller._offers import (
    Offers,
    PaidRequest,
    SellerHooks,
    settle_context,
    verify_result_context,
)
from escrow_py.seller._poster import run_settled_hooks
from escrow_py.seller._store import DeliveryStatus, Payment, PaymentStatus, Reserve, SellerStore, StoredResponse
from escrow_py.seller._verify import Refusal, VerifiedPayment, verify_offchain

log = logging.getLogger("escrow_py.seller.remote")

BATCH = 100
# How often a settlement handed to the facilitator and still pending there is asked about again.
SETTLE_POLL = 2.0


class RemoteOperator:
    """The facilitator's operator as a Signer with no key: the address goes in offers, nothing is signed here."""

    def __init__(self, address: str) -> None:
        self._address = setting_address(address, "the facilitator's operator")

    @property
    def address(self) -> ChecksumAddress:
        return self._address

    def sign_typed_data(self, typed_data: dict[str, Any]) -> bytes:
        raise ConfigError("a seller in facilitator mode holds no key; its facilitator signs")

    def sign_transaction(self, tx: dict[str, Any]) -> bytes:
        raise ConfigError("a seller in facilitator mode holds no key; its facilitator signs")

    def __repr__(self) -> str:
        return f"RemoteOperator({self._address})"


@dataclass(frozen=True, slots=True)
class FacilitatorSellerConfig:
    """A seller's settings in facilitator mode. `escrow` and `operator` default to what the facilitator's
    /supported says (asked once, when the middleware is built); set them to pin them, and a facilitator
    that names others is refused at that point. `timeout` bounds each call to the facilitator."""

    facilitator_url: str
    api_key: str
    network: str
    token: str
    pay_to: str
    routes: list[PricedRoute] | tuple[PricedRoute, ...]
    store: str | Path = "seller.sqlite"
    escrow: str | None = None
    operator: str | None = None
    token_name: str | None = None
    token_version: str | None = None
    public_base_url: str | None = None
    min_time_left: int = 10
    deadline_slack: int = 30
    max_body_bytes: int = 1024 * 1024
    timeout: float = 35.0  # above the facilitator's own tx_timeout (30 s): a slow deposit is waited for, not abandoned
    retry_after: int = 2
    outbox_interval: float = 0.5
    # Serve-first routes (PricedRoute(settlement="serve-first")): the exposure this seller accepts, as SellerConfig.
    serve_first_max_price: int | None = None
    serve_first_max_per_buyer: int | None = None
    serve_first_max_total: int | None = None
    # The seller's verify/settle hooks, as SellerConfig.hooks (README, "Hooks"): around the facilitator's
    # /verify and /settle for hold, around /verify and the queued settlement for serve-first.
    hooks: SellerHooks | None = None

    def __post_init__(self) -> None:
        if self.hooks is not None and not isinstance(self.hooks, SellerHooks):
            raise ConfigError(f"FacilitatorSellerConfig.hooks must be a SellerHooks, got {type(self.hooks).__name__}")
        if not self.facilitator_url.startswith(("http://", "https://")):
            raise ConfigError(f"facilitator_url must be an http(s) URL, got {self.facilitator_url!r}")
        object.__setattr__(self, "facilitator_url", self.facilitator_url.rstrip("/"))
        if not isinstance(self.api_key, str) or not self.api_key:
            raise ConfigError("FacilitatorSellerConfig.api_key is required (x402-escrow facilitator keys create)")
        for name in ("escrow", "operator"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, setting_address(value, f"FacilitatorSellerConfig.{name}"))
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"FacilitatorSellerConfig.timeout must be > 0 seconds, got {self.timeout!r}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def seller_config(self) -> SellerConfig:
        """The settings the shared middleware code reads, completed from the facilitator's /supported."""
        kind = self._supported_kind() if None in (self.escrow, self.operator, self.token_name) else {}
        escrow = self.escrow or kind.get("escrow")
        operator = self.operator or kind.get("operator")
        for name, mine, theirs in (("escrow", self.escrow, kind.get("escrow")),
                                   ("operator", self.operator, kind.get("operator"))):  # fmt: skip
            if mine and theirs and mine != setting_address(theirs, f"the facilitator's /supported {name}"):
                raise ConfigError(f"the facilitator's {name} is {theirs}, this seller pins {mine}")
        if not escrow or not operator:
            raise ConfigError("the facilitator's /supported names no escrow or operator for this network")
        return SellerConfig(
            rpc_url=self.facilitator_url,  # never used as an RPC: this middleware builds no chain
            escrow=str(escrow),
            token=self.token,
            network=self.network,
            pay_to=self.pay_to,
            operator=RemoteOperator(str(operator)),
            routes=self.routes,
            store=self.store,
            min_time_left=self.min_time_left,
            token_name=self.token_name or str(kind.get("name", "USDC")),
            token_version=self.token_version or str(kind.get("version", "2")),
            public_base_url=self.public_base_url,
            deadline_slack=self.deadline_slack,
            max_body_bytes=self.max_body_bytes,
            serve_first_max_price=self.serve_first_max_price,
            serve_first_max_per_buyer=self.serve_first_max_per_buyer,
            serve_first_max_total=self.serve_first_max_total,
            hooks=self.hooks,
            startup_checks=False,
        )

    def _supported_kind(self) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.facilitator_url}/supported", headers=self.headers(), timeout=self.timeout)
            response.raise_for_status()
            kinds = response.json()["kinds"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise ConfigError(f"the facilitator at {self.facilitator_url} did not answer /supported: {exc}") from None
        for kind in kinds:
            if kind.get("scheme") == SCHEME and kind.get("network") == self.network:
                extra = kind.get("extra") or {}
                if str(extra.get("asset", self.token)).lower() != self.token.lower():
                    raise ConfigError(f"the facilitator settles token {extra.get('asset')}, not {self.token}")
                return dict(extra)
        raise ConfigError(f"the facilitator does not support {SCHEME} on {self.network}")


class FacilitatorDown(EscrowError):
    """The facilitator did not answer in time, or answered with its own failure; `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, reason: Reason = Reason.FACILITATOR_UNAVAILABLE) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class FacilitatorClient:
    """The facilitator's API as the seller uses it; one keep-alive connection pool per event loop."""

    def __init__(self, config: FacilitatorSellerConfig) -> None:
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(
                base_url=self.config.facilitator_url,
                headers=self.config.headers(),
                timeout=self.config.timeout,
                verify=tls_context(),
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _post(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        retry = self.config.retry_after
        try:
            response = await self._http().post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise FacilitatorDown(f"{path}: {type(exc).__name__}", retry) from None
        if response.status_code >= 500 or response.status_code in (401, 403, 409, 429):
            # Ours to fix or to wait for (our key, a replica mid-request, our rate): never the buyer's fault.
            try:
                error = str(response.json().get("error", ""))
            except ValueError:
                error = ""
            wait = response.headers.get("retry-after", "")
            seconds = int(wait) if wait.isdigit() and len(wait) < 6 else retry
            reason = Reason.FACILITATOR_UNAVAILABLE
            if response.status_code == 503 and error in {r.value for r in Reason}:
                reason = Reason(error)  # the facilitator's own 503 reason (deposit_pending, chain_unavailable, ...)
            if response.status_code in (401, 403):
                log.error("the facilitator refused this seller's API key on %s: %s", path, response.text[:200])
            raise FacilitatorDown(f"{path}: HTTP {response.status_code} {error}", seconds, reason)
        return response

    async def settle(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        response = await self._post("/settle", _request_body(payload, requirements), None)
        if response.status_code != 200:
            raise FacilitatorDown(
                f"/settle: HTTP {response.status_code} {response.text[:200]}", self.config.retry_after
            )
        return SettleResponse.model_validate(response.json())

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        response = await self._post("/verify", _request_body(payload, requirements), None)
        if response.status_code != 200:
            raise FacilitatorDown(
                f"/verify: HTTP {response.status_code} {response.text[:200]}", self.config.retry_after
            )
        return VerifyResponse.model_validate(response.json())

    async def deliver(self, entries: list[tuple[bytes, bytes]]) -> httpx.Response:
        digest = hashlib.sha256(b"".join(i + h for i, h in entries)).hexdigest()
        body = {"deliveries": [{"escrowId": "0x" + i.hex(), "deliveryHash": "0x" + h.hex()} for i, h in entries]}
        return await self._post("/deliver", body, f"deliver:{digest}")

    async def refund(self, escrow_id: bytes) -> bytes | None:
        """The refund's transaction (None: refunded without one of ours, or queued at the facilitator)."""
        response = await self._post("/refund", {"escrowId": "0x" + escrow_id.hex()}, f"refund:0x{escrow_id.hex()}")
        if response.status_code != 200:
            raise FacilitatorDown(
                f"/refund: HTTP {response.status_code} {response.text[:200]}", self.config.retry_after
            )
        return tx_hash_of(response.json().get("transaction"))


def tx_hash_of(value: object) -> bytes | None:
    """A transaction hash the facilitator answered, or None for none or anything that is not one.

    The facilitator's answers are input like any other: a garbled hash must not crash the outbox or
    the request that asked; it is treated as "no transaction yet".
    """
    try:
        return parse_hex(value, "transaction", 32)
    except ValueError:
        return None


def _payer(parsed: ParsedPayment) -> str:
    assert parsed.payload is not None
    return parsed.payload.terms.buyer


def _request_body(payload: PaymentPayload, requirements: PaymentRequirements) -> dict[str, Any]:
    """The x402 facilitator request (VerifyRequest / SettleRequest) as JSON."""
    return {
        "x402Version": 2,
        "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": requirements.model_dump(by_alias=True, exclude_none=True),
    }


class FacilitatorMiddleware(EscrowMiddleware):
    """EscrowMiddleware whose chain side is a facilitator (see the module's docstring)."""

    def __init__(self, app: ASGIApp, config: FacilitatorSellerConfig) -> None:
        if not isinstance(config, FacilitatorSellerConfig):
            raise EscrowError("FacilitatorMiddleware needs config=FacilitatorSellerConfig(...)")
        self.app = app
        self.remote = config
        self.config = config.seller_config()
        self.store = SellerStore(config.store)
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.facilitator = FacilitatorClient(config)
        self.offers = Offers(self.config)  # delivery-escrow alone: the exact scheme needs a facilitator of its own
        self._kick = asyncio.Event()
        self._outbox: asyncio.Task[None] | None = None
        # Serve-first settlements the facilitator holds as pending: when to ask it again (monotonic seconds).
        self._settle_polled: dict[bytes, float] = {}

    # -- lifespan: the outbox loop ---------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await lifespan(self.app, scope, receive, send, startup=self._start, shutdown=self.stop_outbox)

    async def _start(self) -> str | None:
        self.start_outbox()
        return None

    def start_outbox(self) -> None:
        if self._outbox is None or self._outbox.done():
            self._kick = asyncio.Event()
            self._outbox = asyncio.get_running_loop().create_task(self._outbox_loop(), name="escrow-outbox")

    async def stop_outbox(self) -> None:
        task, self._outbox = self._outbox, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.flush()
        await self.facilitator.aclose()

    async def _outbox_loop(self) -> None:
        while True:
            try:
                await self.flush()
            except Exception:  # a facilitator outage must not end the loop: it retries
                log.exception("outbox pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.remote.outbox_interval)
            self._kick.clear()

    async def flush(self) -> int:
        """Hand queued deliveries and refunds to the facilitator now; the number it accepted."""
        # Nothing is expired here: this seller has no chain clock, and its own clock may be behind or ahead
        # of the chain's. The facilitator's poster judges each deadline by the chain's time.
        accepted = 0
        while True:
            pending = await _blocking(self.store.pending_deliveries, BATCH)
            if not pending:
                break
            entries = [(p.escrow_id, p.delivery_hash) for p in pending]
            try:
                response = await self.facilitator.deliver(entries)
            except FacilitatorDown as down:
                log.warning("deliveries wait for the facilitator: %s", down)
                return accepted
            ids = [p.escrow_id for p in pending]
            if response.status_code == 202:
                await _blocking(self.store.mark_deliveries, ids, DeliveryStatus.POSTED)
                accepted += len(ids)
                continue
            # A refused batch (an entry the facilitator does not know, a conflict): hold it back and log.
            log.error("the facilitator refused deliveries %s: %s", [f"0x{i.hex()}" for i in ids], response.text[:300])
            await _blocking(self.store.defer, [(i, 60.0) for i in ids], response.text[:300])
            break
        for escrow_id, _terms in await _blocking(self.store.refunds_pending):
            try:
                tx = await self.facilitator.refund(escrow_id)
            except FacilitatorDown as down:
                log.warning("refund of 0x%s waits for the facilitator: %s", escrow_id.hex(), down)
                break
            await _blocking(self.store.set_refunded, escrow_id, tx)
        return accepted + await self._flush_settlements()

    async def _flush_settlements(self) -> int:
        """Hand each queued serve-first settlement to the facilitator's /settle with its delivery hash, and
        follow it there until it is paid or lost (the same /settle answers where it stands: it is
        idempotent by escrow id). The number the facilitator accepted or settled."""
        accepted = 0
        now = time.monotonic()
        for queued in await _blocking(self.store.settlements_due, BATCH):
            if self._settle_polled.get(queued.escrow_id, 0.0) > now:
                continue  # handed over and pending there: asked again only every SETTLE_POLL seconds
            # In facilitator mode the stored payload is the buyer's whole x402 PaymentPayload (with the
            # requirements it accepted, which the facilitator checks it against); no local poster reads it.
            payload = PaymentPayload.model_validate_json(queued.payload)
            with_hash = payload.model_copy(
                update={"payload": {**payload.payload, "deliveryHash": "0x" + queued.delivery_hash.hex()}}
            )
            try:
                result = await self.facilitator.settle(with_hash, payload.accepted)
            except FacilitatorDown as down:
                log.warning("settlements wait for the facilitator: %s", down)
                break
            extra = result.extra or {}
            if result.success:
                accepted += 1
                tx = tx_hash_of(result.transaction)
                if extra.get("settlement") == SettlementStatus.SETTLED and tx is not None:
                    await _blocking(self.store.mark_settled, [queued.escrow_id], tx)
                    await _blocking(self.store.settle_final, [queued.escrow_id])  # the facilitator follows reorgs
                    self._settle_polled.pop(queued.escrow_id, None)
                    await run_settled_hooks(self.config.hooks, self.store, [queued.escrow_id], self.config.network)
                else:
                    self._settle_polled[queued.escrow_id] = now + SETTLE_POLL
                continue
            # Refused or lost at the facilitator (unpaid authorization, expired before it landed): a loss.
            reason = result.error_reason or Reason.SETTLEMENT_FAILED
            tx = tx_hash_of(result.transaction)
            log.error("serve-first settlement of 0x%s not paid: %s %s", queued.escrow_id.hex(), reason,
                      result.error_message)  # fmt: skip
            await _blocking(self.store.mark_lost, queued.escrow_id, reason, refuse_buyer=True, tx_hash=tx)
            self._settle_polled.pop(queued.escrow_id, None)
            await run_settled_hooks(self.config.hooks, self.store, [queued.escrow_id], self.config.network)
        return accepted

    # -- a paid request ------------------------------------------------------------------------

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
        assert parsed.escrow_id is not None and parsed.envelope is not None
        escrow_id = parsed.escrow_id
        payment = await _blocking(self.store.payment, escrow_id)
        if payment is not None and payment.response is not None:
            self._verify(parsed, request, payment.accepted_at)  # the same request, terms and signature
            await self._replay(send, payment, payment.response)
            return
        if payment is not None and payment.declined is not None:
            self._verify(
                parsed, replace(request, offer=_as_accepted(request.offer, payment.terms)), payment.accepted_at
            )
            raise declined(payment)
        if payment is not None and payment.serve_first:
            # Recorded and never answered (this seller died mid-handler): served now if the facilitator
            # finds the authorization still unused with time left to settle it.
            request = replace(request, offer=_as_accepted(request.offer, payment.terms))
            verified = self._verify(parsed, request, payment.accepted_at)
            await self._remote_verify(parsed, request)
            await self._serve(scope, receive, send, request, verified=verified, deposit_tx=None, claim=claim,
                              serve_first=True, envelope=parsed.envelope)  # fmt: skip
            return
        hooks = self.config.hooks if payment is None else None  # they run around a new payment, as in local mode
        if payment is None and request.route.serve_first:
            if await self._serve_first_remote(scope, receive, send, request, parsed, claim=claim):
                return
        elif hooks is not None:
            # The SDK's order around the facilitator's calls: before-verify, /verify, after-verify (a
            # serve-first payment falling back to hold ran these already).
            await self._before_verify(parsed, request)
            await self._remote_verify(parsed, request)
            await abort_on(hooks.after_verify, verify_result_context(parsed.envelope, request.offer.to_model(),
                                                                      request.context, _payer(parsed)))  # fmt: skip
        if hooks is not None:
            await abort_on(hooks.before_settle, settle_context(parsed.envelope, request.offer.to_model(),
                                                                request.context))  # fmt: skip
        try:
            result = await self.facilitator.settle(parsed.envelope, request.offer.to_model())
        except FacilitatorDown as down:
            log.warning("paid request %s %s: facilitator unavailable: %s", request.method, request.url, down)
            raise SellerUnavailable(down.reason, "the payment service is unavailable; send the same payment again",
                                    down.retry_after) from None  # fmt: skip
        if not result.success:
            reason, _, detail = (result.error_reason or Reason.DEPOSIT_FAILED).partition(": ")
            raise Refusal(reason, result.error_message or reason, detail=detail or None)
        extra = result.extra or {}
        accepted_at = int(extra.get("acceptedAt", 0))
        # A facilitator's yes for another payment is no yes: this one is checked against this request's offer.
        # Its signature the facilitator recovered before answering (and the token again on deposit).
        verified = verify_offchain(parsed.envelope, request.offer, chain_time=accepted_at, payload=parsed.payload,
                                   signature_checked=True, min_time_left=self.config.min_time_left,
                                   deadline_slack=self.config.deadline_slack)  # fmt: skip
        if "0x" + verified.escrow_id.hex() != extra.get("escrowId"):
            raise FacilitatorDown(f"/settle answered escrow {extra.get('escrowId')} for 0x{verified.escrow_id.hex()}",
                                  self.remote.retry_after)  # fmt: skip
        deposit_tx = tx_hash_of(result.transaction)
        await _blocking(self.store.record_held, escrow_id, verified.terms, accepted_at, _route_name(request.route),
                        deposit_tx)  # fmt: skip
        if hooks is not None:
            await hooks.after_settled(parsed.envelope, request.offer.to_model(), result, escrow_id,
                                      context=request.context)  # fmt: skip
        await self._serve(scope, receive, send, request, verified=verified, deposit_tx=deposit_tx, claim=claim)

    async def _remote_verify(self, parsed: ParsedPayment, request: PaidRequest) -> None:
        """The facilitator's /verify: time by the chain's clock, balance, authorization unused, and a
        simulation of the settlement's pull. Its refusal is the buyer's 402; its absence a 503."""
        assert parsed.envelope is not None
        try:
            result = await self.facilitator.verify(parsed.envelope, request.offer.to_model())
        except FacilitatorDown as down:
            raise SellerUnavailable(down.reason, "the payment service is unavailable; send the same payment again",
                                    down.retry_after) from None  # fmt: skip
        if not result.is_valid:
            reason = result.invalid_reason or Reason.SIMULATION_FAILED
            raise Refusal(reason, result.invalid_message or reason)

    async def _serve_first_remote(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: PaidRequest,
        parsed: ParsedPayment,
        *,
        claim: Claim | None,
    ) -> bool:
        """Serve a serve-first payment now, settled later through the facilitator; False: serve it in hold.

        The facilitator checks it as a settlement would be (/verify, by the chain's time); this seller
        checks the request binding and reserves its own exposure, then runs the handler and queues the
        settlement with the response's hash in one store transaction. The outbox hands it to /settle.
        What a reservation's refusal leads to is the machine's (_machine.after_reserve), as in local mode.
        """
        assert parsed.escrow_id is not None and parsed.envelope is not None and parsed.payload is not None
        hooks = self.config.hooks
        if hooks is not None:
            await self._before_verify(parsed, request)
        await self._remote_verify(parsed, request)
        # Judged by the chain's time at the facilitator; here, at the last time it is valid (no chain clock).
        terms, auth = parsed.payload.terms, parsed.payload.authorization
        reference = min(terms.deadline, auth.valid_before) - self.config.min_time_left - 1
        verified = self._verify(parsed, request, reference)
        if hooks is not None:
            await abort_on(hooks.after_verify, verify_result_context(parsed.envelope, request.offer.to_model(),
                                                                      request.context, verified.buyer))  # fmt: skip
        # In facilitator mode the store keeps the buyer's whole x402 envelope: the outbox hands it to /settle.
        record = parsed.envelope.model_dump_json(by_alias=True, exclude_none=True)
        step = ServeFirst(verified, reference, settle_due(verified), parsed.envelope, record)
        config = self.config
        per_buyer, total = config.serve_first_max_per_buyer or 0, config.serve_first_max_total or 0
        refused = await _blocking(
            self.store.begin_serve_first,
            parsed.escrow_id,
            verified.terms,
            accepted_at=reference,
            route=_route_name(request.route),
            payload=record,
            due=step.due,
            max_per_buyer=per_buyer,
            max_total=total,
        )
        after = after_reserve(step, Reserve.DONE if refused is None else refused, request.route,
                              per_buyer=per_buyer, total=total)  # fmt: skip
        if isinstance(after, Deposit):
            log.info("payment 0x%s served in hold mode: %s", parsed.escrow_id.hex(), refused)
            return False
        if isinstance(after, Reject):
            raise after.rejected
        if isinstance(after, Unavailable):
            raise SellerUnavailable(after.reason, after.public, after.retry_after)
        assert isinstance(after, Serve)
        await self._serve(scope, receive, send, request, verified=verified, deposit_tx=None, claim=claim,
                          serve_first=True, envelope=parsed.envelope)  # fmt: skip
        return True

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
        """Serve-first goes as EscrowMiddleware's (its settlement is queued in the store, or declined by the
        seller's before-settle hooks), then wakes the outbox; hold's delivery and refund go to the facilitator."""
        if serve_first:
            await super()._serve(scope, receive, send, request, verified=verified, deposit_tx=None, claim=claim,
                                 serve_first=True, envelope=envelope)  # fmt: skip
            self._kick.set()
            return
        escrow_id, terms = verified.escrow_id, verified.terms
        if not await self._still_held(claim):
            await self._answer_of_another(send, escrow_id)
            return
        response = await run_handler(self.app, scope, receive, request.body)
        if response.status < 400:
            keep = kept(verified, response.body, deposit_tx, serve_first=False)
            save = functools.partial(self.store.save_served, escrow_id, terms, response, keep.delivery_hash)
            if not await self._store_once(claim, save):
                await self._answer_of_another(send, escrow_id)  # another run's answer was stored, or is coming
                return
            self._kick.set()
            await send_response(send, response, self._settlement(terms.buyer, keep.answer))
            return
        if not await self._still_held(claim):  # a refund now could undo the answer of the run that took over
            await self._answer_of_another(send, escrow_id)
            return
        refund_tx: bytes | None = None
        refunded = False
        try:
            refund_tx = await self.facilitator.refund(escrow_id)
            refunded = True
        except FacilitatorDown as down:
            log.warning("refund of 0x%s queued, facilitator unavailable: %s", escrow_id.hex(), down)
        if not await self._store_once(claim, functools.partial(self.store.save_failed, escrow_id, response, refund_tx)):
            await self._answer_of_another(send, escrow_id)
            return
        if refunded and refund_tx is None:
            await _blocking(self.store.set_refunded, escrow_id, None)
        # `refunded` with no transaction: the facilitator found it refunded already.
        answer = handler_failed(escrow_id, terms, deposit_tx, refund_tx, serve_first=False, refunded=refunded)
        await send_response(send, response, self._settlement(terms.buyer, answer))

    async def _replay(self, send: Send, payment: Payment, response: StoredResponse) -> None:
        """A refunded or serve-first payment replays as EscrowMiddleware's does; a served one says `held`: its
        delivery is the facilitator's to post, and this seller has no chain to ask."""
        if payment.serve_first or payment.status in (PaymentStatus.REFUNDED, PaymentStatus.REFUND_PENDING):
            await super()._replay(send, payment, response)
            return
        answer = served(payment.escrow_id, payment.terms, delivery_hash(response.body), payment.deposit_tx,
                        serve_first=False)  # fmt: skip
        await send_response(send, response, self._settlement(payment.terms.buyer, answer))


__all__ = ["FacilitatorClient", "FacilitatorMiddleware", "FacilitatorSellerConfig", "RemoteOperator"]
