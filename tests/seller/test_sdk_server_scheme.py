"""delivery-escrow registered on the SDK's own resource server beside `exact` (DeliveryEscrowServerScheme)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.address import to_checksum_address
from fastapi import FastAPI
from fixtures.chain import BUYER2, Chain
from helpers import BUYER, OPERATOR, SELLER, address, dev
from x402 import x402Client, x402Facilitator, x402ResourceServer
from x402.http import HTTPRequestContext, PaymentOption, RouteConfig, decode_payment_required_header
from x402.http.clients.httpx import x402_httpx_transport
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.http.types import HTTPTransportContext
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
from x402.schemas import AssetAmount, PaymentPayload, SettleContext, SupportedKind, SupportedResponse

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import DeliveryEscrowScheme
from escrow_py.chain.registry import Deployment, record
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import canonical_url, delivery_hash, request_hash
from escrow_py.seller import DeliveryEscrowServerScheme
from escrow_py.seller._price import default_token

from .sdk_parts import FACILITATOR, NETWORK, stock_client


class EscrowKindListing:
    """Lists delivery-escrow in /supported with its operator and escrow, as issue 17's facilitator does.

    Only the listing: the SDK refuses to build an offer for a (scheme, network) no facilitator
    lists. Verifying and depositing delivery-escrow payments is that facilitator's job, not tested here.
    """

    def __init__(self, chain: Chain) -> None:
        self.extra = {"operator": address(OPERATOR), "escrow": chain.escrow.address}

    def get_supported(self) -> SupportedResponse:
        kind = SupportedKind(x402_version=2, scheme="delivery-escrow", network=NETWORK, extra=self.extra)
        return SupportedResponse(kinds=[kind], extensions=[], signers={})

    async def verify(self, payload: Any, requirements: Any) -> Any:
        raise NotImplementedError("delivery-escrow verification belongs to the escrow facilitator")

    async def settle(self, payload: Any, requirements: Any) -> Any:
        raise NotImplementedError("delivery-escrow settlement belongs to the escrow facilitator")


def _sdk_seller(chain: Chain) -> FastAPI:
    exact = x402Facilitator()
    register_exact_evm_facilitator(exact, FacilitatorWeb3Signer(dev_private_key(FACILITATOR), chain.node.url), NETWORK)
    server = x402ResourceServer([EscrowKindListing(chain), exact])
    server.register(NETWORK, DeliveryEscrowServerScheme(token=chain.token.address))
    server.register(NETWORK, ExactEvmServerScheme())  # type: ignore[no-untyped-call, arg-type]
    domain = {"name": "USDC", "version": "2"}
    app = FastAPI()

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, str]:
        return {"item": item}

    accepts = [
        PaymentOption(scheme="delivery-escrow", pay_to=address(SELLER), price="$0.01", network=NETWORK),
        PaymentOption(
            scheme="exact",
            pay_to=address(SELLER),
            price=AssetAmount(amount="10000", asset=chain.token.address, extra=domain),
            network=NETWORK,
        ),
    ]
    app.add_middleware(PaymentMiddlewareASGI, server=server, routes={"GET /report/:item": RouteConfig(accepts=accepts)})
    return app


def test_the_sdk_resource_server_offers_delivery_escrow_beside_exact(chain: Chain, tmp_path: Path) -> None:
    app = _sdk_seller(chain)

    async def run() -> tuple[Any, Any, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            required = decode_payment_required_header((await http.get("/report/x")).headers["payment-required"])
        with DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "b.sqlite") as plugin:
            ours = x402Client().register(NETWORK, plugin)
            ours.set_spend_controls({"allowed_assets": [{"network": NETWORK, "asset": chain.token.address}]})
            signed = await ours.create_payment_payload(required)
        transport = x402_httpx_transport(stock_client(chain, BUYER2), httpx.ASGITransport(app=app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as stock:
            return required, signed, await stock.get("/report/stock")

    before = chain.token.balance_of(address(SELLER))
    required, signed, paid = asyncio.run(run())
    escrow, exact = required.accepts
    assert (escrow.scheme, exact.scheme) == ("delivery-escrow", "exact")
    assert (escrow.amount, escrow.asset, escrow.pay_to) == ("10000", chain.token.address, address(SELLER))
    assert escrow.extra["escrow"] == chain.escrow.address and escrow.extra["operator"] == address(OPERATOR)
    assert (escrow.extra["name"], escrow.extra["version"]) == ("USDC", "2")
    # The requestHash is the one this project's middleware and client derive for GET http://t/report/x.
    assert escrow.extra["requestHash"] == "0x" + request_hash("GET", canonical_url("http://t/report/x")).hex()
    # This project's SDK plugin signs the offer (genuine escrow, terms bound to that requestHash).
    assert signed.accepted.scheme == "delivery-escrow"
    assert signed.payload["terms"]["requestHash"] == escrow.extra["requestHash"]
    # And the stock client pays exact on the same route, settled on chain by the SDK's facilitator.
    assert paid.status_code == 200 and chain.token.balance_of(address(SELLER)) == before + 10_000


def test_the_scheme_refuses_prices_the_token_cannot_carry() -> None:
    scheme = DeliveryEscrowServerScheme()
    amount = scheme.parse_price("$0.01", "eip155:8453")
    assert (amount.amount, amount.extra) == ("10000", {"name": "USD Coin", "version": "2"})
    assert amount.asset == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    with pytest.raises(ConfigError, match="not a positive whole number"):
        scheme.parse_price("$0.0000001", "eip155:84532")  # ExactEvmServerScheme says "0"


def test_a_local_chain_prices_in_its_deployments_test_usdc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402_ESCROW_DEPLOYMENTS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="no default token for eip155:31337"):
        default_token("eip155:31337")
    token = "0x" + "ab" * 20
    record(Deployment("eip155:31337", 31337, to_checksum_address("0x" + "cd" * 20), token=token), local=True)
    local = default_token("eip155:31337")
    assert (local.address.lower(), local.name, local.version, local.decimals) == (token, "USDC", "2", 6)
    amount = DeliveryEscrowServerScheme().parse_price("$0.01", "eip155:31337")
    assert (amount.amount, amount.asset.lower()) == ("10000", token)


def test_the_scheme_commits_to_the_served_body_where_the_transport_gives_it() -> None:
    scheme = DeliveryEscrowServerScheme()
    request = HTTPRequestContext(adapter=None, path="/report/x", method="GET")  # type: ignore[arg-type]
    payload = PaymentPayload(x402_version=2, payload={}, accepted=_any_requirements())
    body = b'{"item":"x"}'

    def enrich(phase: str, transport: Any) -> Any:
        ctx = SettleContext(payment_payload=payload, requirements=payload.accepted, transport_context=transport)
        ctx.phase = phase  # type: ignore[assignment]
        return scheme.enrich_settlement_payload(ctx)

    served = HTTPTransportContext(request=request, response_body=body)
    assert enrich("after-handler", served) == {"deliveryHash": "0x" + delivery_hash(body).hex()}
    assert enrich("before-handler", served) is None  # the deposit: nothing served yet
    assert enrich("after-handler", HTTPTransportContext(request=request)) is None  # the SDK's middleware: no body


def _any_requirements() -> Any:
    from x402.schemas import PaymentRequirements

    return PaymentRequirements(
        scheme="delivery-escrow", network=NETWORK, asset="0x" + "11" * 20, amount="1", pay_to="0x" + "22" * 20,
        max_timeout_seconds=60, extra={},
    )  # fmt: skip
