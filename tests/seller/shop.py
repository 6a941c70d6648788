"""A real FastAPI app behind the seller middleware, on the session's anvil, reached through the ASGI stack."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fixtures.chain import Chain
from helpers import OPERATOR, SELLER, address, dev
from starlette.types import ASGIApp
from web3.types import RPCEndpoint

from escrow_devtools import harness
from escrow_py.chain.escrow import Deposited
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

PRICE = 10_000


class ProcessDied(BaseException):
    """Stands for the seller process dying mid-handler: nothing in the middleware may catch it."""


@dataclass
class Shop:
    """The app, its config, and how often each handler ran."""

    app: FastAPI
    config: SellerConfig
    calls: dict[str, int] = field(default_factory=dict)
    crash_next: bool = False

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://testserver")

    @property
    def middleware(self) -> EscrowMiddleware:
        return EscrowMiddleware.of(self.app)


def make_config(chain: Chain, store: Path | str, **overrides: Any) -> SellerConfig:
    settings: dict[str, Any] = {
        "rpc_url": chain.node.url,
        "escrow": chain.escrow.address,
        "token": chain.token.address,
        "network": "eip155:84532",
        "pay_to": address(SELLER),
        "operator": dev(OPERATOR),
        "routes": [
            PricedRoute("GET", "/report/{item}", amount=PRICE, max_timeout_seconds=120, description="a report"),
            PricedRoute("POST", "/echo", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("PUT", "/echo", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/fail", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/boom", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/fail-broke", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/crashy", amount=PRICE, max_timeout_seconds=120),
        ],
        "store": store,
        "min_time_left": 10,
    }
    settings.update(overrides)
    return SellerConfig(**settings)


def make_shop(chain: Chain, store: Path, **overrides: Any) -> Shop:
    app = FastAPI()
    config = make_config(chain, store, **overrides)
    shop = Shop(app, config)

    def count(name: str) -> int:
        shop.calls[name] = shop.calls.get(name, 0) + 1
        return shop.calls[name]

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, Any]:
        return {"item": item, "call": count("report")}

    @app.put("/echo")
    @app.post("/echo")
    async def echo(request: Request) -> Response:
        count("echo")
        return Response(content=b"echo:" + await request.body(), media_type="application/octet-stream")

    @app.get("/fail")
    async def fail() -> JSONResponse:
        count("fail")
        return JSONResponse({"error": "upstream down"}, status_code=503)

    @app.get("/boom")
    async def boom() -> None:
        count("boom")
        raise RuntimeError("handler crashed")

    @app.get("/fail-broke")
    async def fail_broke() -> JSONResponse:
        count("fail-broke")
        set_gas_money(chain, OPERATOR, 0)  # the operator can no longer pay for the refund
        return JSONResponse({"error": "upstream down"}, status_code=502)

    @app.get("/crashy")
    async def crashy() -> dict[str, str]:
        count("crashy")
        if shop.crash_next:
            raise ProcessDied
        return {"served": "after the crash"}

    @app.get("/free")
    async def free() -> dict[str, bool]:
        return {"free": True}

    app.add_middleware(EscrowMiddleware, config=config)
    return shop


@pytest.fixture
def shop(chain: Chain, tmp_path: Path) -> Iterator[Shop]:
    # Bring the chain's clock to the wall clock: a reverted snapshot leaves it behind.
    chain.mine()
    yield make_shop(chain, tmp_path / "seller.sqlite")


@contextmanager
def served(app: ASGIApp, *, started: bool = True) -> Iterator[tuple[str, uvicorn.Server]]:
    """`app` on a real uvicorn on 127.0.0.1 (lifespan on); yields its base URL and the server.

    With started=False it does not wait for the start (a failed start-up is what is tested).
    """
    with harness.serving(app, wait=started, stop_timeout=30) as running:
        yield running.url, running.server
    assert not running.thread.is_alive(), "uvicorn did not stop"


def set_gas_money(chain: Chain, who: int, wei: int) -> None:
    """anvil_setBalance: a real node refusing an unfunded sender, produced on demand."""
    chain.w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [address(who), hex(wei)])


def deposits(chain: Chain, from_block: int) -> list[Deposited]:
    latest = int(chain.w3.eth.block_number)
    if from_block > latest:
        return []
    return [e for e in chain.escrow.events(from_block, latest) if isinstance(e, Deposited)]
