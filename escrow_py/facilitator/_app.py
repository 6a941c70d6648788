"""The facilitator's HTTP API (FastAPI): x402's /supported, /verify, /settle plus /deliver, /refund, /escrows.

Every request but /supported, /healthz, /metrics and the console carries a seller's API
key (`Authorization: Bearer x4f_...`). Order of checks, so nothing is parsed for a stranger:
body size (413), key (401), rate limit (429), idempotency key (400/409/422), body (422),
ownership of the payTo or escrow (403). Bodies are the SDK's pydantic models where x402
defines them; an invalid payment is a 200 with `isValid: false` / `success: false`, as
x402's facilitators answer.

Idempotency: /deliver and /refund need an `Idempotency-Key` header; any request may carry
one. /settle is idempotent by the payment itself: its escrow id names one deposit (claimed
by a lease row while it is made), so the same payment sent again answers the same deposit,
and another body for the same escrow id is judged against what the buyer signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402.schemas import SettleRequest, VerifyRequest

from escrow_py.console import CSP, render_fragment, render_page, static_file
from escrow_py.facilitator._keys import ApiKey, IdempotencyConflict, KeyStore, body_digest
from escrow_py.facilitator._metrics import FacilitatorMetrics
from escrow_py.facilitator._service import Facilitator, FacilitatorError
from escrow_py.protocol.reasons import Reason
from escrow_py.seller._store import DeliveryStatus, PaymentStatus
from escrow_py.seller._verify import Refusal

log = logging.getLogger("escrow_py.facilitator")

MAX_IDEMPOTENCY_KEY = 200
PRUNE_EVERY = 3600.0  # seconds between two prunes of old idempotency records
_HEX32 = r"^0x[0-9a-fA-F]{64}$"


class DeliveryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    escrow_id: str = Field(alias="escrowId", pattern=_HEX32)
    delivery_hash: str = Field(alias="deliveryHash", pattern=_HEX32)


class DeliverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deliveries: list[DeliveryEntry] = Field(min_length=1, max_length=100)


class RefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    escrow_id: str = Field(alias="escrowId", pattern=_HEX32)
    reason: str = Field(default="handler_failed", max_length=200)


class _Refused(Exception):
    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers or {}


class BodyLimit:
    """413 for a body over `limit` bytes (by Content-Length, or as it streams), before the app sees any of it.

    The body is read here in full (it is small by definition) and handed to the app in one message.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _plain(send, 413, "request body too large")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.limit:
                await _plain(send, 413, "request body too large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _plain(send: Send, status: int, text: str) -> None:
    body = json.dumps({"error": Reason.BODY_TOO_LARGE, "message": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _model_json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True)


Act = Callable[[ApiKey, Any], Awaitable[tuple[int, dict[str, Any]]]]


class _Api:
    """The endpoints' shared steps: authenticate, rate-limit, parse, claim the idempotency key, act, record."""

    def __init__(self, facilitator: Facilitator, keys: KeyStore, metrics: FacilitatorMetrics) -> None:
        self.facilitator = facilitator
        self.keys = keys
        self.metrics = metrics

    async def authenticate(self, request: Request) -> ApiKey:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise _Refused(401, Reason.UNAUTHORIZED, "an API key is required: Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip
        key, wait = await anyio.to_thread.run_sync(self._admit, presented.strip())
        if key is None:
            raise _Refused(401, Reason.UNAUTHORIZED, "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
        if wait > 0:
            raise _Refused(429, Reason.RATE_LIMITED, "too many requests for this API key",
                           {"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
        return key

    def _admit(self, presented: str) -> tuple[ApiKey | None, float]:
        """The key `presented` names and its wait under the rate limit every replica shares (counted only for a
        genuine key: a stranger cannot spend a seller's limit by naming its key id)."""
        key = self.keys.authenticate(presented)
        if key is None:
            return None, 0.0
        config = self.facilitator.config
        return key, self.keys.take(key.key_id, rate=config.rate, burst=config.burst)

    @staticmethod
    def parse(model: type[BaseModel] | None, raw: bytes) -> Any:
        if model is None:
            return None
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise _Refused(422, Reason.INVALID_REQUEST, f"{where}: {first.get('msg')}") from None

    async def handle(
        self,
        request: Request,
        endpoint: str,
        model: type[BaseModel] | None,
        act: Act,
        *,
        idempotent: bool = False,
    ) -> Response:
        """One request through every check; each answer is counted by endpoint and status.

        `idempotent`: the request changes state and needs an Idempotency-Key. Any request that
        carries one is answered once under it.
        """
        started = time.perf_counter()
        status = 500
        try:
            key = await self.authenticate(request)
            raw = await request.body()
            parsed = self.parse(model, raw)
            claim = request.headers.get("idempotency-key")
            if idempotent and claim is None:
                raise _Refused(400, Reason.IDEMPOTENCY_KEY_REQUIRED, "this request needs an Idempotency-Key header")
            if claim is None:
                status, body = await act(key, parsed)
                return JSONResponse(body, status_code=status)
            status, body = await self._once(key, claim, act, parsed, endpoint=endpoint, raw=raw)
            return JSONResponse(body, status_code=status)
        except _Replayed as replayed:
            status = replayed.status
            return JSONResponse(replayed.body, status_code=status, headers={"Idempotent-Replayed": "true"})
        except (_Refused, FacilitatorError) as refusal:
            status = refusal.status
            headers = dict(refusal.headers) if isinstance(refusal, _Refused) else {}
            if isinstance(refusal, FacilitatorError) and refusal.retry_after is not None:
                headers["Retry-After"] = str(refusal.retry_after)
            return JSONResponse(_body_of(refusal), status_code=status, headers=headers)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _once(
        self, key: ApiKey, claim: str, act: Act, parsed: Any, *, endpoint: str, raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Act once under the idempotency key `claim`; a replay gets the recorded answer (_Replayed)."""
        if len(claim) > MAX_IDEMPOTENCY_KEY:
            raise _Refused(400, Reason.INVALID_IDEMPOTENCY_KEY, f"Idempotency-Key is over {MAX_IDEMPOTENCY_KEY} chars")
        keys = self.keys
        try:
            recorded = await anyio.to_thread.run_sync(keys.begin, key.key_id, claim, endpoint, body_digest(raw))
        except IdempotencyConflict as conflict:
            raise _Refused(conflict.status, Reason.IDEMPOTENCY_CONFLICT, str(conflict)) from None
        if recorded is not None:
            raise _Replayed(recorded.status, recorded.body)
        try:
            status, body = await act(key, parsed)
        except (_Refused, FacilitatorError) as refusal:
            if refusal.status < 500:
                await anyio.to_thread.run_sync(keys.finish, key.key_id, claim, refusal.status, _body_of(refusal))
            else:
                await anyio.to_thread.run_sync(keys.abandon, key.key_id, claim)
            raise
        except BaseException:
            await anyio.to_thread.run_sync(keys.abandon, key.key_id, claim)
            raise
        await anyio.to_thread.run_sync(keys.finish, key.key_id, claim, status, body)
        return status, body


class _Replayed(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def create_app(
    facilitator: Facilitator,
    keys: KeyStore,
    *,
    console_token: str | None = None,
    run_poster: bool = True,
    metrics: FacilitatorMetrics | None = None,
) -> ASGIApp:
    """The facilitator's ASGI app. `run_poster`: post queued deliveries in the background (passes are
    serialised per process, and the chain skips an entry another replica delivered first), and prune
    idempotency records past `idempotency_retention` at start and hourly."""
    metrics = metrics or FacilitatorMetrics()
    app = FastAPI(
        title="x402-escrow facilitator",
        lifespan=_poster_lifespan(facilitator, keys, metrics) if run_poster else None,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.facilitator = facilitator
    app.state.metrics = metrics
    _payment_routes(app, _Api(facilitator, keys, metrics))
    _operator_routes(app, facilitator, metrics, console_token)
    return BodyLimit(app, facilitator.config.max_body_bytes)


def _poster_lifespan(facilitator: Facilitator, keys: KeyStore, metrics: FacilitatorMetrics) -> Callable[[FastAPI], Any]:
    retention = facilitator.config.idempotency_retention

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        pruned_at = -PRUNE_EVERY

        async def poster() -> None:
            nonlocal pruned_at
            while not stop.is_set():
                if retention > 0 and time.monotonic() - pruned_at >= PRUNE_EVERY:
                    pruned_at = time.monotonic()
                    try:
                        deleted = await anyio.to_thread.run_sync(lambda: keys.prune(before=time.time() - retention))
                        log.info("pruned idempotency records older than %.0f s: %s", retention, deleted)
                    except Exception:  # a database hiccup: tried again at the next hour
                        log.exception("idempotency prune failed")
                try:
                    report = await anyio.to_thread.run_sync(facilitator.post_pending)
                    if report.posted:
                        metrics.transactions.labels("deliver", "mined").inc()
                    if report.errors:
                        metrics.transactions.labels("deliver", "failed").inc()
                except Exception:  # an RPC outage must not end the loop
                    log.exception("poster pass failed")
                    metrics.transactions.labels("deliver", "failed").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), facilitator.config.poster_interval)

        task = asyncio.get_running_loop().create_task(poster())
        try:
            yield
        finally:
            stop.set()
            await task

    return lifespan


def _payment_routes(app: FastAPI, api: _Api) -> None:
    facilitator, metrics = api.facilitator, api.metrics

    @app.get("/supported")
    async def supported() -> JSONResponse:
        metrics.requests.labels("supported", "200").inc()
        return JSONResponse(_model_json(facilitator.supported()))

    async def verify_act(key: ApiKey, body: VerifyRequest) -> tuple[int, dict[str, Any]]:
        try:
            result = await anyio.to_thread.run_sync(
                facilitator.verify, body.payment_payload, body.payment_requirements, key
            )
        except Refusal as rejected:
            return 200, {"isValid": False, "invalidReason": rejected.error, "invalidMessage": str(rejected)}
        return 200, _model_json(result)

    async def settle_act(key: ApiKey, body: SettleRequest) -> tuple[int, dict[str, Any]]:
        result = await anyio.to_thread.run_sync(
            facilitator.settle, body.payment_payload, body.payment_requirements, key
        )
        outcome = "rejected" if not result.success else "mined" if result.transaction else "known"
        metrics.transactions.labels("deposit", outcome).inc()
        return 200, _model_json(result)

    async def deliver_act(key: ApiKey, body: DeliverRequest) -> tuple[int, dict[str, Any]]:
        entries = [(bytes.fromhex(e.escrow_id[2:]), bytes.fromhex(e.delivery_hash[2:])) for e in body.deliveries]
        if len({i for i, _ in entries}) != len(entries):
            raise _Refused(422, Reason.INVALID_REQUEST, "an escrow id appears twice in one batch")
        return 202, {"deliveries": await anyio.to_thread.run_sync(facilitator.deliver, entries, key)}

    async def refund_act(key: ApiKey, body: RefundRequest) -> tuple[int, dict[str, Any]]:
        answer = await anyio.to_thread.run_sync(facilitator.refund, bytes.fromhex(body.escrow_id[2:]), key)
        metrics.transactions.labels("refund", "mined" if answer["transaction"] else "pending").inc()
        return 200, dict(answer)

    @app.post("/verify")
    async def verify(request: Request) -> Response:
        return await api.handle(request, "verify", VerifyRequest, verify_act)

    @app.post("/settle")
    async def settle(request: Request) -> Response:
        # Idempotent by the payment itself: its escrow id names one deposit, whoever asks and however often.
        return await api.handle(request, "settle", SettleRequest, settle_act)

    @app.post("/deliver")
    async def deliver(request: Request) -> Response:
        return await api.handle(request, "deliver", DeliverRequest, deliver_act, idempotent=True)

    @app.post("/refund")
    async def refund(request: Request) -> Response:
        return await api.handle(request, "refund", RefundRequest, refund_act, idempotent=True)

    @app.get("/escrows/{escrow_id}")
    async def escrow(escrow_id: str, request: Request) -> Response:
        async def act(key: ApiKey, _: None) -> tuple[int, dict[str, Any]]:
            if re.fullmatch(_HEX32, escrow_id) is None:
                raise _Refused(422, Reason.INVALID_REQUEST, "escrow id must be 0x and 64 hex digits")
            return 200, await anyio.to_thread.run_sync(facilitator.escrow, bytes.fromhex(escrow_id[2:]), key)

        return await api.handle(request, "escrows", None, act)


def _operator_routes(
    app: FastAPI, facilitator: Facilitator, metrics: FacilitatorMetrics, console_token: str | None
) -> None:
    """/healthz, /metrics and the operator console (only with a console token: it shows every seller's money)."""
    ledger = facilitator.ledger

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        figures = await anyio.to_thread.run_sync(ledger.figures)
        metrics.held.clear()
        for token, value in figures.held_by_token.items():
            metrics.held.labels(token).set(value)
        metrics.escrows.clear()
        for state, count in figures.by_state.items():
            metrics.escrows.labels(state).set(count)
        depth = await anyio.to_thread.run_sync(ledger.queue_depths)
        metrics.queue.labels("deliveries").set(depth.get(DeliveryStatus.PENDING, 0))
        metrics.queue.labels("refunds").set(depth.get(PaymentStatus.REFUND_PENDING, 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def allowed(request: Request) -> bool:
        return console_token is not None and hmac.compare_digest(request.query_params.get("token", ""), console_token)

    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}
    hidden = JSONResponse({"error": Reason.NOT_FOUND}, status_code=404)

    @app.get("/console")
    async def console(request: Request) -> Response:
        if not allowed(request):
            return hidden
        figures = await anyio.to_thread.run_sync(ledger.figures)
        explorer = await anyio.to_thread.run_sync(facilitator.explorer)
        page = render_page(figures, title="x402-escrow facilitator", base="/console", explorer=explorer,
                           query=str(request.query_params))  # fmt: skip
        return HTMLResponse(page, headers=headers)

    @app.get("/console/fragment")
    async def console_fragment(request: Request) -> Response:
        if not allowed(request):
            return hidden
        figures = await anyio.to_thread.run_sync(ledger.figures)
        explorer = await anyio.to_thread.run_sync(facilitator.explorer)
        return HTMLResponse(render_fragment(figures, explorer=explorer), headers=headers)

    @app.get("/console/data.json")
    async def console_data(request: Request) -> Response:
        if not allowed(request):
            return hidden
        figures = await anyio.to_thread.run_sync(ledger.figures)
        return JSONResponse(figures.to_json(), headers={"Cache-Control": "no-store"})

    @app.get("/console/static/{name}")
    async def console_static(name: str) -> Response:
        found = static_file(name)
        if found is None:
            return hidden
        content, media_type = found
        return Response(content, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


def _body_of(refusal: _Refused | FacilitatorError) -> dict[str, Any]:
    if isinstance(refusal, _Refused):
        return {"error": refusal.error, "message": refusal.message}
    return {"error": str(refusal.reason), "message": refusal.message}
