"""The facilitator's HTTP API (FastAPI): x402's /supported, /verify, /settle plus /deliver, /refund, /escrows.

Every request but /supported, /healthz, /metrics and the console carries a seller's API
key (`Authorization: Bearer x4f_...`). Order of checks, so nothing is parsed for a stranger:
body size (413), key (401), rate limit (429), idempotency key (400/409/422), body (422),
ownership of the payTo or escrow (403). Bodies are the SDK's pydantic models where x402
defines them; an invalid payment is a 200 with `isValid: false` / `success: false`, as
x402's facilitators answer.

Idempotency: /deliver and /refund need an `Idempotency-Key` header. /settle may carry one;
without it the payment's escrow id is the key (the same payment settles once, and another
body claiming the same escrow id is refused 422).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402.schemas import SettleRequest, VerifyRequest

from escrow_py.console import CSP, EXPLORERS, render_fragment, render_page, static_file
from escrow_py.errors import ProtocolError
from escrow_py.facilitator._keys import ApiKey, IdempotencyConflict, KeyStore, body_digest
from escrow_py.facilitator._metrics import FacilitatorMetrics
from escrow_py.facilitator._service import Facilitator, FacilitatorError
from escrow_py.seller._store import PENDING, REFUND_PENDING
from escrow_py.seller._verify import PaymentRejected
from escrow_py.wire import EscrowPayload

MAX_IDEMPOTENCY_KEY = 200
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


class RateLimiter:
    """A token bucket per API key (in this replica): `burst` at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> float:
        """0 if allowed, else the seconds until a token is free."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate


class BodyLimit:
    """413 for a body over `limit` bytes, by Content-Length or as it streams, before anything reads it."""

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
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _plain(send, 413, "request body too large")


class _TooLarge(Exception):
    pass


async def _plain(send: Send, status: int, text: str) -> None:
    body = json.dumps({"error": "body_too_large", "message": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _model_json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True)


def create_app(
    facilitator: Facilitator,
    keys: KeyStore,
    *,
    console_token: str | None = None,
    run_poster: bool = True,
    metrics: FacilitatorMetrics | None = None,
) -> ASGIApp:
    """The facilitator's ASGI app. `run_poster`: post queued deliveries in the background (every replica may;
    passes are serialised per process and the chain skips what another replica delivered)."""
    config = facilitator.config
    metrics = metrics or FacilitatorMetrics()
    limiter = RateLimiter(config.rate, config.burst)
    explorer = EXPLORERS.get(config.chain_id)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        import asyncio

        stop = asyncio.Event()

        async def poster() -> None:
            while not stop.is_set():
                try:
                    report = await anyio.to_thread.run_sync(facilitator.post_pending)
                    if report.posted:
                        metrics.transactions.labels("deliver", "mined").inc()
                    if report.errors:
                        metrics.transactions.labels("deliver", "failed").inc()
                except Exception:  # noqa: BLE001 - an RPC outage must not end the loop
                    metrics.transactions.labels("deliver", "failed").inc()
                try:
                    await asyncio.wait_for(stop.wait(), config.poster_interval)
                except TimeoutError:
                    pass

        task = asyncio.get_running_loop().create_task(poster()) if run_poster else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task

    app = FastAPI(title="x402-escrow facilitator", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.facilitator = facilitator
    app.state.metrics = metrics

    def authenticate(request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise _Refused(401, "unauthorized", "an API key is required: Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip
        key = keys.authenticate(presented.strip())
        if key is None:
            raise _Refused(401, "unauthorized", "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
        wait = limiter.take(key.key_id)
        if wait > 0:
            raise _Refused(429, "rate_limited", "too many requests for this API key",
                           {"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
        return key

    def parse(model: type[BaseModel], raw: bytes) -> Any:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise _Refused(422, "invalid_request", f"{where}: {first.get('msg')}") from None

    async def guarded(
        request: Request,
        endpoint: str,
        act: Callable[[ApiKey, bytes], Awaitable[tuple[int, dict[str, Any]]]],
        *,
        idempotency: Callable[[bytes], str | None] | None = None,
    ) -> Response:
        """Authenticate, claim the idempotency key, act, record the answer; every refusal is counted."""
        started = time.perf_counter()
        status = 500
        try:
            key = authenticate(request)
            raw = await request.body()
            claim: str | None = None
            if idempotency is not None:
                claim = request.headers.get("idempotency-key") or idempotency(raw)
                if claim is None:
                    raise _Refused(400, "idempotency_key_required", "this request needs an Idempotency-Key header")
                if len(claim) > MAX_IDEMPOTENCY_KEY:
                    raise _Refused(
                        400, "invalid_idempotency_key", f"Idempotency-Key is over {MAX_IDEMPOTENCY_KEY} chars"
                    )
                try:
                    recorded = await anyio.to_thread.run_sync(keys.begin, key.key_id, claim, endpoint, body_digest(raw))
                except IdempotencyConflict as conflict:
                    raise _Refused(conflict.status, "idempotency_conflict", str(conflict)) from None
                if recorded is not None:
                    status = recorded.status
                    return JSONResponse(recorded.body, status_code=status, headers={"Idempotent-Replayed": "true"})
            try:
                status, body = await act(key, raw)
            except (_Refused, FacilitatorError) as refusal:
                if claim is not None and _status_of(refusal) < 500:
                    await anyio.to_thread.run_sync(
                        keys.finish, key.key_id, claim, _status_of(refusal), _body_of(refusal)
                    )
                elif claim is not None:
                    await anyio.to_thread.run_sync(keys.abandon, key.key_id, claim)
                raise
            except BaseException:
                if claim is not None:
                    await anyio.to_thread.run_sync(keys.abandon, key.key_id, claim)
                raise
            if claim is not None:
                await anyio.to_thread.run_sync(keys.finish, key.key_id, claim, status, body)
            return JSONResponse(body, status_code=status)
        except (_Refused, FacilitatorError) as refusal:
            status = _status_of(refusal)
            headers = dict(refusal.headers) if isinstance(refusal, _Refused) else {}
            if isinstance(refusal, FacilitatorError) and refusal.retry_after is not None:
                headers["Retry-After"] = str(refusal.retry_after)
            return JSONResponse(_body_of(refusal), status_code=status, headers=headers)
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def escrow_key(raw: bytes) -> str | None:
        """The implied idempotency key of a /settle: its payment's escrow id."""
        try:
            data = json.loads(raw)
            terms = EscrowPayload.from_json(data["paymentPayload"]["payload"]).terms
            return f"settle:0x{terms.escrow_id(config.chain_id, config.escrow).hex()}"
        except (ValueError, KeyError, TypeError, ProtocolError):
            return None

    @app.get("/supported")
    async def supported() -> JSONResponse:
        metrics.requests.labels("supported", "200").inc()
        return JSONResponse(_model_json(facilitator.supported()))

    @app.post("/verify")
    async def verify(request: Request) -> Response:
        async def act(key: ApiKey, raw: bytes) -> tuple[int, dict[str, Any]]:
            body = parse(VerifyRequest, raw)
            try:
                result = await anyio.to_thread.run_sync(
                    facilitator.verify, body.payment_payload, body.payment_requirements, key
                )
            except PaymentRejected as rejected:
                return 200, {"isValid": False, "invalidReason": rejected.error, "invalidMessage": str(rejected)}
            return 200, _model_json(result)

        return await guarded(request, "verify", act)

    @app.post("/settle")
    async def settle(request: Request) -> Response:
        async def act(key: ApiKey, raw: bytes) -> tuple[int, dict[str, Any]]:
            body = parse(SettleRequest, raw)
            result = await anyio.to_thread.run_sync(
                facilitator.settle, body.payment_payload, body.payment_requirements, key
            )
            outcome = (
                "mined" if result.success and result.transaction else "rejected" if not result.success else "known"
            )
            metrics.transactions.labels("deposit", outcome).inc()
            return 200, _model_json(result)

        return await guarded(request, "settle", act, idempotency=escrow_key)

    @app.post("/deliver")
    async def deliver(request: Request) -> Response:
        async def act(key: ApiKey, raw: bytes) -> tuple[int, dict[str, Any]]:
            body = parse(DeliverRequest, raw)
            entries = [(bytes.fromhex(e.escrow_id[2:]), bytes.fromhex(e.delivery_hash[2:])) for e in body.deliveries]
            if len({i for i, _ in entries}) != len(entries):
                raise _Refused(422, "invalid_request", "an escrow id appears twice in one batch")
            answers = await anyio.to_thread.run_sync(facilitator.deliver, entries, key)
            return 202, {"deliveries": answers}

        return await guarded(request, "deliver", act, idempotency=lambda _: None)

    @app.post("/refund")
    async def refund(request: Request) -> Response:
        async def act(key: ApiKey, raw: bytes) -> tuple[int, dict[str, Any]]:
            body = parse(RefundRequest, raw)
            answer = await anyio.to_thread.run_sync(facilitator.refund, bytes.fromhex(body.escrow_id[2:]), key)
            metrics.transactions.labels("refund", "mined" if answer["transaction"] else "pending").inc()
            return 200, dict(answer)

        return await guarded(request, "refund", act, idempotency=lambda _: None)

    @app.get("/escrows/{escrow_id}")
    async def escrow(escrow_id: str, request: Request) -> Response:
        async def act(key: ApiKey, _: bytes) -> tuple[int, dict[str, Any]]:
            if len(escrow_id) != 66 or not escrow_id.startswith("0x"):
                raise _Refused(422, "invalid_request", "escrow id must be 0x and 64 hex digits")
            try:
                raw_id = bytes.fromhex(escrow_id[2:])
            except ValueError:
                raise _Refused(422, "invalid_request", "escrow id must be 0x and 64 hex digits") from None
            return 200, await anyio.to_thread.run_sync(facilitator.escrow, raw_id, key)

        return await guarded(request, "escrows", act)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        figures = await anyio.to_thread.run_sync(facilitator.ledger.figures)
        metrics.held.clear()
        for token, value in figures.held_by_token.items():
            metrics.held.labels(token).set(value)
        metrics.escrows.clear()
        for state, count in figures.by_state.items():
            metrics.escrows.labels(state).set(count)
        depth = await anyio.to_thread.run_sync(facilitator.ledger.queue_depths)
        metrics.queue.labels("deliveries").set(depth.get(PENDING, 0))
        metrics.queue.labels("refunds").set(depth.get(REFUND_PENDING, 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- the operator console -----------------------------------------------------------------

    def console_allowed(request: Request) -> bool:
        if console_token is None:
            return False
        import hmac

        return hmac.compare_digest(request.query_params.get("token", ""), console_token)

    def console_headers() -> dict[str, str]:
        return {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}

    @app.get("/console")
    async def console(request: Request) -> Response:
        if not console_allowed(request):
            return JSONResponse({"error": "not_found"}, status_code=404)
        figures = await anyio.to_thread.run_sync(facilitator.ledger.figures)
        page = render_page(
            figures, title="x402-escrow facilitator", base="/console", explorer=explorer,
            query=f"token={console_token}",
        )  # fmt: skip
        return HTMLResponse(page, headers=console_headers())

    @app.get("/console/fragment")
    async def console_fragment(request: Request) -> Response:
        if not console_allowed(request):
            return JSONResponse({"error": "not_found"}, status_code=404)
        figures = await anyio.to_thread.run_sync(facilitator.ledger.figures)
        return HTMLResponse(render_fragment(figures, explorer=explorer), headers=console_headers())

    @app.get("/console/data.json")
    async def console_data(request: Request) -> Response:
        if not console_allowed(request):
            return JSONResponse({"error": "not_found"}, status_code=404)
        figures = await anyio.to_thread.run_sync(facilitator.ledger.figures)
        return JSONResponse(figures.to_json(), headers={"Cache-Control": "no-store"})

    @app.get("/console/static/{name}")
    async def console_static(name: str) -> Response:
        found = static_file(name)
        if found is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        content, media_type = found
        return Response(content, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return BodyLimit(app, config.max_body_bytes)


def _status_of(refusal: _Refused | FacilitatorError) -> int:
    return refusal.status


def _body_of(refusal: _Refused | FacilitatorError) -> dict[str, Any]:
    if isinstance(refusal, _Refused):
        return {"error": refusal.error, "message": refusal.message}
    return {"error": str(refusal.reason), "message": refusal.message}
