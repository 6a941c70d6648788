"""A real FastAPI app behind the real seller middleware, on the session's anvil, for the buyer's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fixtures.chain import Chain
from helpers import OPERATOR, SELLER, address, dev
from starlette.types import ASGIApp

from escrow_devtools import harness
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

PRICE = 10_000
BASE_URL = "http://shop.test"


@dataclass
class Shop:
    app: FastAPI
    calls: dict[str, int]

    @property
    def middleware(self) -> EscrowMiddleware:
        return EscrowMiddleware.of(self.app)

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app)


@pytest.fixture
def shop(chain: Chain, tmp_path: Path) -> Shop:
    return make_shop(chain, tmp_path)


def make_shop(
    chain: Chain, tmp_path: Path, *, max_timeout_seconds: int = 120, settlement: str = "hold", **settings: Any
) -> Shop:
    """The shop app; `settings` override SellerConfig's defaults (e.g. deadline_slack). With
    settlement="serve-first" every route serves first, within generous exposure limits."""
    chain.mine()  # a reverted snapshot leaves the chain's clock behind the wall clock
    app = FastAPI()
    calls: dict[str, int] = {}
    if settlement == "serve-first":
        limits = {"serve_first_max_price": PRICE, "serve_first_max_per_buyer": 100 * PRICE}
        settings = {**limits, "serve_first_max_total": 100 * PRICE, **settings}
    config = SellerConfig(
        rpc_url=chain.node.url,
        escrow=chain.escrow.address,
        token=chain.token.address,
        network="eip155:84532",
        pay_to=address(SELLER),
        operator=dev(OPERATOR),
        routes=[
            PricedRoute("GET", path, amount=PRICE, max_timeout_seconds=max_timeout_seconds, settlement=settlement)
            for path in ("/report/{item}", "/fail")
        ]
        + [PricedRoute("POST", "/echo", amount=PRICE, max_timeout_seconds=max_timeout_seconds, settlement=settlement)],
        store=tmp_path / "seller.sqlite",
        confirmations=1,
        **settings,
    )

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, Any]:
        calls["report"] = calls.get("report", 0) + 1
        return {"item": item, "call": calls["report"]}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(content=b"echo:" + await request.body(), media_type="application/octet-stream")

    @app.get("/fail")
    async def fail() -> JSONResponse:
        return JSONResponse({"error": "upstream down"}, status_code=503)

    app.add_middleware(EscrowMiddleware, config=config)
    return Shop(app, calls)


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """`app` on a real uvicorn server on 127.0.0.1, for the duration of the block; yields its base URL."""
    with harness.serving(app, lifespan="auto", stop_timeout=10) as running:
        yield running.url


@pytest.fixture
def served(shop: Shop) -> Iterator[str]:
    """The shop on a real uvicorn server on 127.0.0.1."""
    with serving(shop.app) as url:
        yield url


class LostPayment(httpx.TransportError):
    """The paid request's fate is unknown to the buyer: the process died around the send."""


class Faulty(httpx.AsyncBaseTransport):
    """Wraps a real transport; `on_paid` decides what happens to the request that carries a payment.

    Stands for faults a real network cannot produce on demand: a send that dies, a
    reply that is lost after the seller acted, a tampered 402 or body.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        drop_before: bool = False,
        drop_after: bool = False,
        edit_402: Callable[[httpx.Response], httpx.Response] | None = None,
        edit_paid: Callable[[httpx.Response], httpx.Response] | None = None,
        edit_paid_request: Callable[[httpx.Request], None] | None = None,
    ) -> None:
        self.inner = inner
        self.drop_before, self.drop_after = drop_before, drop_after
        self.edit_402, self.edit_paid = edit_402, edit_paid
        self.edit_paid_request = edit_paid_request
        self.paid_sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        paid = PAYMENT_SIGNATURE_HEADER in request.headers
        if paid and self.drop_before:
            raise LostPayment("connection died before the paid request left")
        if paid and self.edit_paid_request is not None:
            self.edit_paid_request(request)
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if paid:
            self.paid_sent += 1
            if self.drop_after:
                raise LostPayment("connection died after the seller received the paid request")
            if self.edit_paid is not None:
                return self.edit_paid(response)
        elif response.status_code == 402 and self.edit_402 is not None:
            return self.edit_402(response)
        return response
