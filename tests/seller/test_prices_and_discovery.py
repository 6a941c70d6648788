"""Money prices, dynamic price and payTo, and bazaar discovery metadata on a priced route."""

from __future__ import annotations

import asyncio
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER, SELLER2, address, dev
from x402.extensions.bazaar import (
    BAZAAR,
    OutputConfig,
    QueryDiscoveryInfo,
    QueryInput,
    declare_discovery_extension,
    validate_and_extract,
    validate_discovery_extension_spec,
)
from x402.http import HTTPRequestContext, decode_payment_required_header
from x402.schemas import AssetAmount

from escrow_py.buyer import AsyncEscrowClient, Journal
from escrow_py.chain.registry import Deployment, record
from escrow_py.protocol.errors import ConfigError
from escrow_py.seller import PricedRoute

from .shop import deposits, make_config, make_shop

USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"


def _config(chain: Chain, tmp_path: Path, *routes: PricedRoute, **settings: Any) -> Any:
    return make_config(chain, tmp_path / "s.sqlite", routes=list(routes), **settings)


@pytest.mark.parametrize(
    ("price", "atomic"),
    [
        ("$0.01", 10_000),
        ("0.25", 250_000),
        (0.5, 500_000),
        ("1.5 USDC", 1_500_000),
        ("$0.000001", 1),
        (AssetAmount(amount="777", asset="<token>"), 777),
        ({"amount": "42", "asset": "<token>", "extra": {"name": "USDC", "version": "2"}}, 42),
    ],
)
def test_a_money_price_resolves_to_atomic_units(chain: Chain, tmp_path: Path, price: Any, atomic: int) -> None:
    if isinstance(price, AssetAmount):
        price = price.model_copy(update={"asset": chain.token.address})
    elif isinstance(price, dict):
        price = {**price, "asset": chain.token.address}
    config = _config(chain, tmp_path, PricedRoute("GET", "/x", price=price))
    assert config.routes[0].amount == atomic and config.routes[0].price is None


@pytest.mark.parametrize(
    ("price", "rule"),
    [
        ("$0.0000001", "not a positive whole number"),  # the SDK would truncate this to "0"
        ("$0.0100009", "not a positive whole number"),  # and this to 10000
        ("$0", "not a positive whole number"),
        ("-1", "not money"),
        ("1.5 USDT", "is in USDT"),
        ({"amount": "10", "asset": USDC_BASE}, "names asset"),
        ({"amount": "1.5", "asset": "<token>"}, "positive whole number of atomic units"),
        ({"amount": "10", "asset": "<token>", "extra": {"name": "USD Coin"}}, "extra.name"),
        (object(), "neither money"),
    ],
)
def test_a_price_that_cannot_be_paid_exactly_is_refused_at_start(
    chain: Chain, tmp_path: Path, price: Any, rule: str
) -> None:
    if isinstance(price, dict) and price["asset"] == "<token>":
        price = {**price, "asset": chain.token.address}
    with pytest.raises(ConfigError, match=rule):
        _config(chain, tmp_path, PricedRoute("GET", "/x", price=price))


def test_amount_and_price_are_exclusive(chain: Chain) -> None:
    with pytest.raises(ConfigError, match="exactly one of amount"):
        PricedRoute("GET", "/x", amount=5, price="$0.01")
    with pytest.raises(ConfigError, match="exactly one of amount"):
        PricedRoute("GET", "/x")


def test_the_sdk_table_gives_the_domain_of_a_known_token(chain: Chain, tmp_path: Path) -> None:
    route = PricedRoute("GET", "/x", price="$0.01")
    base = {"network": "eip155:8453", "token": USDC_BASE, "startup_checks": False}
    # Base's USDC signs as "USD Coin": a seller that says "USDC" would have every payment fail.
    with pytest.raises(ConfigError, match="'USD Coin'"):
        _config(chain, tmp_path, route, token_name="USDC", **base)
    config = _config(chain, tmp_path, route, **base)
    assert (config.token_name, config.token_version, config.routes[0].amount) == ("USD Coin", "2", 10_000)


def test_dynamic_price_and_pay_to_are_resolved_per_request_and_paid(chain: Chain, tmp_path: Path) -> None:
    seen: list[HTTPRequestContext] = []

    async def price(ctx: HTTPRequestContext) -> str:  # async callables are awaited, as in the SDK
        seen.append(ctx)
        return "$0.02" if ctx.adapter.get_query_param("size") == "large" else "$0.01"

    def pay_to(ctx: HTTPRequestContext) -> str:
        return address(SELLER2) if ctx.path.endswith("vip") else address(SELLER)

    route = PricedRoute("GET", "/report/{item}", price=price, pay_to=pay_to)
    shop = make_shop(chain, tmp_path / "s.sqlite", routes=[route])

    async def run() -> tuple[list[Any], httpx.Response]:
        offers = []
        async with shop.client() as http:
            for path in ("/report/a", "/report/a?size=large", "/report/vip"):
                offers.append(decode_payment_required_header((await http.get(path)).headers["payment-required"]))
        async with AsyncEscrowClient(
            dev(BUYER), chain.node.url, tmp_path / "b.sqlite", transport=httpx.ASGITransport(app=shop.app)
        ) as client:
            return offers, await client.get("http://testserver/report/vip?size=large")

    start = int(chain.w3.eth.block_number) + 1
    offers, paid = asyncio.run(run())
    assert [o.accepts[0].amount for o in offers] == ["10000", "20000", "10000"]
    assert [o.accepts[0].pay_to for o in offers] == [address(SELLER), address(SELLER), address(SELLER2)]
    assert seen[0].method == "GET" and seen[0].route_pattern == "/report/:item"
    assert paid.status_code == 200
    (deposit,) = deposits(chain, start)
    assert (deposit.terms.amount, deposit.terms.seller) == (20_000, address(SELLER2))


def test_a_dynamic_price_that_cannot_be_paid_is_a_seller_error_not_an_offer(chain: Chain, tmp_path: Path) -> None:
    shop = make_shop(
        chain, tmp_path / "s.sqlite", routes=[PricedRoute("GET", "/report/{item}", price=lambda _: "$1e-9")]
    )

    async def run() -> httpx.Response:
        async with shop.client() as http:
            return await http.get("/report/a")

    response = asyncio.run(run())
    assert response.status_code == 500 and "payment-required" not in response.headers


def test_bazaar_metadata_decodes_with_the_sdks_helpers(chain: Chain, tmp_path: Path) -> None:
    discovery = declare_discovery_extension(
        input={"format": "json"},
        input_schema={"properties": {"format": {"type": "string"}}},
        output=OutputConfig(example={"item": "x", "call": 1}, schema={"properties": {"item": {"type": "string"}}}),
    )
    route = PricedRoute(
        "GET", "/report/{item}", amount=10_000, description="Score an item", mime_type="application/json",
        discovery=discovery,
    )  # fmt: skip
    shop = make_shop(chain, tmp_path / "s.sqlite", routes=[route, PricedRoute("GET", "/fail", amount=1)])

    async def run() -> tuple[Any, Any]:
        async with shop.client() as http:
            priced = decode_payment_required_header((await http.get("/report/abc")).headers["payment-required"])
            plain = decode_payment_required_header((await http.get("/fail")).headers["payment-required"])
            return priced, plain

    priced, plain = asyncio.run(run())
    bazaar = priced.extensions[BAZAAR.key]
    assert validate_discovery_extension_spec(bazaar).valid
    extracted = validate_and_extract(bazaar)
    assert extracted.valid, extracted.errors
    info = extracted.info
    assert isinstance(info, QueryDiscoveryInfo) and isinstance(info.input, QueryInput)
    assert info.input.method == "GET"
    assert info.input.path_params == {"item": "abc"}
    assert bazaar["routeTemplate"] == "/report/:item"
    assert bazaar["info"]["settlement"] == "hold"
    assert info.output is not None and info.output.example == {"item": "x", "call": 1}
    assert priced.resource.description == "Score an item" and priced.resource.mime_type == "application/json"
    assert plain.extensions is None  # only routes that declare it
    with pytest.raises(ConfigError, match="declare_discovery_extension"):
        PricedRoute("GET", "/x", amount=1, discovery={"info": {}})


def test_without_a_token_the_seller_is_paid_in_the_networks_usdc(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = PricedRoute("GET", "/x", price="$0.01")
    sepolia = _config(chain, tmp_path, route, token="", startup_checks=False)
    assert (sepolia.token, sepolia.token_name, sepolia.token_version) == (
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"
    )  # fmt: skip
    base = _config(chain, tmp_path, route, token="", network="eip155:8453", startup_checks=False)
    assert (base.token, base.token_name, base.token_version) == (USDC_BASE, "USD Coin", "2")
    # A local chain: the TestUSDC recorded beside the local escrow deployment.
    monkeypatch.setenv("X402_ESCROW_DEPLOYMENTS_DIR", str(tmp_path))
    record(Deployment("eip155:31337", 31337, chain.escrow.address, token=chain.token.address), local=True)
    local = _config(chain, tmp_path, route, token="", network="eip155:31337", startup_checks=False)
    assert (local.token, local.token_name, local.token_version) == (chain.token.address, "USDC", "2")
    assert local.routes[0].amount == 10_000


def test_a_paid_request_replays_at_the_price_it_was_paid_after_the_price_moved(chain: Chain, tmp_path: Path) -> None:
    prices = ["$0.01"]
    shop = make_shop(
        chain, tmp_path / "s.sqlite", routes=[PricedRoute("GET", "/report/{item}", price=lambda _: prices[0])]
    )
    journal = tmp_path / "b.sqlite"

    async def pay() -> httpx.Response:
        async with AsyncEscrowClient(
            dev(BUYER), chain.node.url, journal, transport=httpx.ASGITransport(app=shop.app)
        ) as client:
            return await client.get("http://testserver/report/a")

    paid = asyncio.run(pay())
    with closing(Journal(journal)) as journaled:
        (entry,) = journaled.entries()
    prices[0] = "$0.02"  # the seller's price moves after the sale

    async def replay() -> httpx.Response:
        async with shop.client() as http:
            return await http.get("/report/a", headers={"PAYMENT-SIGNATURE": entry.payment_header})

    again = asyncio.run(replay())
    assert again.status_code == 200 and again.content == paid.content and shop.calls["report"] == 1
