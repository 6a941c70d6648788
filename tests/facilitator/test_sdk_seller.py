"""A seller on the official SDK's own resource server and FastAPI middleware sells delivery-escrow through this
project's facilitator, called with the SDK's HTTPFacilitatorClient, to this project's buyer client.

The SDK's default flow (verify before the handler, settle after it) is serve-first: the facilitator's
/verify checks the payment and simulates its pull, the handler runs, and the after-handler settle carries
the delivery hash (DeliveryEscrowServerScheme reads it from DeliveryHashHeader, because the SDK's
middleware hands a scheme no response body); the facilitator queues it and settles it in a settleMany.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import localhttp
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev
from seller.payer import quote, sign_payment
from seller.shop import served
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, PaymentOption, RouteConfig
from x402.http.facilitator_client_base import AuthHeaders
from x402.http.middleware.fastapi import PaymentMiddlewareASGI

from escrow_py.buyer import AsyncEscrowClient
from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    SettlementStatus,
    decode_payment_response,
)
from escrow_py.seller import DeliveryEscrowServerScheme, DeliveryHashHeader

from .kit import Fac, settled_on_chain
from .test_api import wait_for

NETWORK = "eip155:84532"


class ApiKey:
    """The seller's facilitator API key, as the SDK's HTTPFacilitatorClient takes credentials (an AuthProvider)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def get_auth_headers(self) -> AuthHeaders:
        header = {"Authorization": f"Bearer {self.key}"}
        return AuthHeaders(verify=header, settle=header, supported=header)


def _sdk_seller(chain: Chain, fac: Fac, calls: list[str], extra: dict[str, str]) -> FastAPI:
    client = HTTPFacilitatorClient(FacilitatorConfig(url=fac.url, auth_provider=ApiKey(fac.key), timeout=60))
    server = x402ResourceServer(client)
    server.register(NETWORK, DeliveryEscrowServerScheme(token=chain.token.address, token_name="USDC",
                                                        token_version="2"))  # fmt: skip
    app = FastAPI()

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, str]:
        calls.append(item)
        return {"item": item, "body": "the bytes the buyer gets"}

    option = PaymentOption(scheme="delivery-escrow", pay_to=address(SELLER), price="$0.01", network=NETWORK,
                           extra=extra)  # fmt: skip
    app.add_middleware(DeliveryHashHeader)  # inside the SDK's middleware: it hashes what the SDK sends

    @app.get("/fail/{item}")
    async def fail(item: str) -> JSONResponse:
        calls.append(f"fail {item}")
        return JSONResponse({"error": "upstream down"}, status_code=502)

    routes = {"GET /report/:item": RouteConfig(accepts=[option]), "GET /fail/:item": RouteConfig(accepts=[option])}
    app.add_middleware(PaymentMiddlewareASGI, server=server, routes=routes)
    return app


def _buy(chain: Chain, url: str, tmp_path: Path) -> tuple[bytes, str]:
    """One paid GET with this project's buyer client: the body and its PAYMENT-RESPONSE header."""

    async def buy() -> tuple[bytes, str]:
        async with AsyncEscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite", timeout=60) as buyer:
            response = await buyer.get(url)
            assert response.status_code == 200, response.text
            return response.content, response.headers[PAYMENT_RESPONSE_HEADER]

    return asyncio.run(buy())


def test_an_sdk_seller_sells_delivery_escrow_through_the_facilitator(chain: Chain, fac: Fac, tmp_path: Path) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    seller_before = chain.token.balance_of(address(SELLER))
    calls: list[str] = []
    with served(_sdk_seller(chain, fac, calls, {"settlement": "serve-first"})) as (url, _server):
        body, header = _buy(chain, f"{url}/report/sdk", tmp_path)
    assert calls == ["sdk"]
    settle = decode_payment_response(header)
    extra = SettlementExtra.from_json(settle.extra)
    assert settle.success and extra.settlement == SettlementStatus.PENDING  # served first, settlement queued
    assert extra.delivery_hash == delivery_hash(body)  # the hash of the bytes this buyer got
    record = fac.facilitator.store.settlement(extra.escrow_id)
    assert record is not None and record.delivery_hash == delivery_hash(body)

    wait_for(lambda: extra.escrow_id in settled_on_chain(chain, start), timeout=60)
    assert settled_on_chain(chain, start)[extra.escrow_id] == delivery_hash(
        body
    )  # committed on chain by the facilitator's settleMany
    assert chain.token.balance_of(address(SELLER)) == seller_before + 10_000


def test_an_sdk_seller_in_the_escrow_flow_deposits_before_and_delivers_after(
    chain: Chain, fac: Fac, tmp_path: Path
) -> None:
    """The SDK's `escrow` payment flow is hold: its before-handler settle is the facilitator's deposit, its
    after-handler settle (the same payload plus the delivery hash) queues the delivery for deliverMany."""
    chain.mine()
    calls: list[str] = []
    with served(_sdk_seller(chain, fac, calls, {"paymentFlow": "escrow"})) as (url, _server):
        body, header = _buy(chain, f"{url}/report/held", tmp_path)
    assert calls == ["held"]
    settle = decode_payment_response(header)
    extra = SettlementExtra.from_json(settle.extra)
    assert settle.success and extra.delivery_hash == delivery_hash(body)
    assert settle.transaction.startswith("0x")  # the deposit, sent before the handler ran
    deposits = [e for e in chain.escrow.events(0, int(chain.w3.eth.block_number)) if e.id == extra.escrow_id]
    assert any(isinstance(e, Deposited) for e in deposits)
    wait_for(lambda: chain.escrow.state_of(extra.escrow_id) == State.RELEASED, timeout=60)
    delivered = chain.escrow.delivery_of(extra.escrow_id, since=0)
    assert delivered is not None and delivered.delivery_hash == delivery_hash(body)


def test_a_failed_handler_in_the_escrow_flow_is_refunded_by_the_cancel_settle(
    chain: Chain, fac: Fac, tmp_path: Path
) -> None:
    chain.mine()
    calls: list[str] = []
    buyer_before = chain.token.balance_of(address(BUYER))
    with served(_sdk_seller(chain, fac, calls, {"paymentFlow": "escrow"})) as (url, _server):

        async def buy() -> httpx.Response:
            async with localhttp.AsyncClient(base_url=url, timeout=60) as http:
                required = await quote(http, "GET", "/fail/1")
                payment = sign_payment(chain, required)
                return await http.get("/fail/1", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

        response = asyncio.run(buy())
    assert response.status_code == 502 and calls == ["fail 1"]
    settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
    extra = SettlementExtra.from_json(settle.extra)
    assert settle.success and extra.state == State.REFUNDED and extra.refund_transaction is not None
    assert chain.escrow.state_of(extra.escrow_id) == State.REFUNDED  # deposited before, refunded after
    chain.mine()
    assert chain.token.balance_of(address(BUYER)) == buyer_before
