"""A seller with no operator key and no RPC URL sells through a facilitator process.

The facilitator is a real `x402-escrow facilitator serve` process on the session's anvil;
the seller is FastAPI behind FacilitatorMiddleware on uvicorn; the buyer is the test
payer. Stopping the facilitator must never leave a buyer paid and unserved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import localhttp
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address
from seller.payer import buy, quote, sign_payment
from seller.shop import served

from escrow_devtools.anvil import dev_private_key, free_port
from escrow_py.facilitator import KeyStore
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    decode_payment_response,
)
from escrow_py.seller import FacilitatorMiddleware, FacilitatorSellerConfig, PricedRoute

from .process import FacilitatorProcess
from .test_api import wait_for

PRICE = 10_000


@dataclass
class Remote:
    chain: Chain
    facilitator: FacilitatorProcess
    app: FastAPI
    url: str
    calls: dict[str, int] = field(default_factory=dict)

    def client(self) -> httpx.AsyncClient:
        return localhttp.AsyncClient(base_url=self.url, timeout=60)


async def resend_until_served(client: httpx.AsyncClient, path: str, header: str) -> httpx.Response:
    """The same payment again after each 503's Retry-After (the seller's own trouble), for up to 90 s."""
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        response = await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: header})
        if response.status_code != 503 or asyncio.get_running_loop().time() > deadline:
            return response
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))


def shop(facilitator_url: str, api_key: str, chain: Chain, store: Path, calls: dict[str, int],
         on_kill: list[FacilitatorProcess]) -> FastAPI:  # fmt: skip
    app = FastAPI()

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, object]:
        calls["report"] = calls.get("report", 0) + 1
        return {"item": item, "call": calls["report"]}

    @app.get("/fail")
    async def fail() -> JSONResponse:
        calls["fail"] = calls.get("fail", 0) + 1
        return JSONResponse({"error": "upstream down"}, status_code=502)

    @app.get("/kills-facilitator")
    async def kills() -> dict[str, str]:
        # The handler runs after the deposit: the facilitator dies before the delivery is handed over.
        await asyncio.to_thread(on_kill[0].kill)
        return {"served": "while the facilitator was down"}

    routes = [PricedRoute("GET", p, amount=PRICE, max_timeout_seconds=120)
              for p in ("/report/{item}", "/fail", "/kills-facilitator")]  # fmt: skip
    config = FacilitatorSellerConfig(
        facilitator_url=facilitator_url, api_key=api_key, network="eip155:84532", token=chain.token.address,
        pay_to=address(SELLER), routes=routes, store=store, timeout=35.0, outbox_interval=0.2,
    )  # fmt: skip
    app.add_middleware(FacilitatorMiddleware, config=config)
    return app


@pytest.fixture
def remote(chain: Chain, tmp_path: Path) -> Iterator[Remote]:
    chain.mine()
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    keys.close()
    process = FacilitatorProcess(chain, db, free_port())
    calls: dict[str, int] = {}
    app = shop(process.url, key, chain, tmp_path / "seller.sqlite", calls, [process])
    try:
        with served(app) as (url, _server):
            yield Remote(chain, process, app, url, calls)
    finally:
        process.stop()


def test_a_keyless_seller_sells_and_the_delivery_is_released(remote: Remote) -> None:
    asyncio.run(_a_keyless_seller_sells_and_the_delivery_is_released(remote))


async def _a_keyless_seller_sells_and_the_delivery_is_released(remote: Remote) -> None:
    chain = remote.chain
    async with remote.client() as client:
        response, payment = await buy(client, chain, "GET", "/report/7")
        assert response.status_code == 200, response.text
        settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
        extra = SettlementExtra.from_json(settle.extra)
        assert extra.escrow_id == payment.escrow_id
        assert extra.delivery_hash == delivery_hash(response.content)
        assert settle.transaction.startswith("0x")  # the facilitator's deposit
        # A replay is the same bytes, not a second handler run or a second charge.
        again = await client.get("/report/7", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.content == response.content
    assert remote.calls["report"] == 1
    wait_for(lambda: chain.escrow.state_of(payment.escrow_id) == State.RELEASED)
    released = [
        e for e in chain.escrow.events(0, int(chain.w3.eth.block_number)) if getattr(e, "id", None) == payment.escrow_id
    ]
    assert any(getattr(e, "delivery_hash", None) == delivery_hash(response.content) for e in released)
    # The operator key sits in the facilitator's environment only: never in what it writes out.
    assert dev_private_key(OPERATOR)[2:].lower() not in remote.facilitator.log.read_text().lower()


def test_a_failed_handler_is_refunded_through_the_facilitator(remote: Remote) -> None:
    asyncio.run(_a_failed_handler_is_refunded_through_the_facilitator(remote))


async def _a_failed_handler_is_refunded_through_the_facilitator(remote: Remote) -> None:
    chain = remote.chain
    before = chain.token.balance_of(address(BUYER))
    async with remote.client() as client:
        response, payment = await buy(client, chain, "GET", "/fail")
    assert response.status_code == 502
    assert decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER]).error_reason == "handler_failed_refunded"
    assert chain.escrow.state_of(payment.escrow_id) == State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == before


def test_facilitator_down_is_a_503_with_retry_after_and_nothing_is_charged(remote: Remote) -> None:
    asyncio.run(_facilitator_down_is_a_503_with_retry_after_and_nothing_is_charged(remote))


async def _facilitator_down_is_a_503_with_retry_after_and_nothing_is_charged(remote: Remote) -> None:
    chain = remote.chain
    async with remote.client() as client:
        required = await quote(client, "GET", "/report/1")  # the 402 needs no facilitator
        remote.facilitator.kill()
        payment = sign_payment(chain, required)
        response = await client.get("/report/1", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"] == "facilitator_unavailable"
        assert remote.calls.get("report", 0) == 0
        assert chain.escrow.state_of(payment.escrow_id) == State.NONE
        # Back up: the same payment, resent after Retry-After as a buyer does, is served once.
        remote.facilitator.start()
        served_now = await resend_until_served(client, "/report/1", payment.header)
        assert served_now.status_code == 200, served_now.text
    assert remote.calls["report"] == 1
    wait_for(lambda: chain.escrow.state_of(payment.escrow_id) == State.RELEASED)


def test_deliveries_queued_while_the_facilitator_is_down_leave_when_it_returns(remote: Remote) -> None:
    asyncio.run(_deliveries_queued_while_the_facilitator_is_down_leave_when_it_returns(remote))


async def _deliveries_queued_while_the_facilitator_is_down_leave_when_it_returns(remote: Remote) -> None:
    chain = remote.chain
    async with remote.client() as client:
        payment = sign_payment(chain, await quote(client, "GET", "/kills-facilitator"))
        response = await resend_until_served(client, "/kills-facilitator", payment.header)
    assert response.status_code == 200, response.text  # deposited before the kill: served
    assert remote.facilitator.process is not None and remote.facilitator.process.poll() is not None
    await asyncio.sleep(1.5)  # several outbox passes fail meanwhile
    assert chain.escrow.state_of(payment.escrow_id) == State.HELD
    remote.facilitator.start()
    wait_for(lambda: chain.escrow.state_of(payment.escrow_id) == State.RELEASED)
    assert address(OPERATOR) == payment.terms.operator
