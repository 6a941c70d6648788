"""One 402 for every client: the SDK's `exact` beside delivery-escrow, on one route, over real HTTP.

The stock SDK client (exact only) pays exact, settled by the SDK's own facilitator on anvil;
this project's client pays delivery-escrow on the same route. The seller orders the offers
and may leave exact out.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from eth_typing import HexStr
from fixtures.chain import BUYER2, Chain
from helpers import BUYER, SELLER, address, dev
from x402.http import (
    FacilitatorConfig,
    HTTPFacilitatorClient,
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.http.clients.httpx import x402_httpx_transport
from x402.schemas import AbortResult, PaymentRequirements

from escrow_devtools.anvil import free_port
from escrow_py.buyer import AsyncEscrowClient, DeliveryEscrowScheme, PaymentRejected
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER
from escrow_py.seller import ExactOffer, PricedRoute, SellerHooks

from .hook_books import Books
from .payer import quote, sign_payment
from .sdk_parts import exact_facilitator, stock_client
from .shop import PRICE, deposits, make_shop, served
from .test_startup import _failed_start


def _routes(**report: Any) -> list[PricedRoute]:
    settings: dict[str, Any] = {"max_timeout_seconds": 120, "amount": PRICE, **report}
    return [
        PricedRoute("GET", "/report/{item}", **settings),
        PricedRoute("GET", "/fail", amount=PRICE, max_timeout_seconds=120),
    ]


async def _stock_get(chain: Chain, url: str, buyer: int = BUYER2) -> httpx.Response:
    transport = x402_httpx_transport(stock_client(chain, buyer), localhttp.AsyncHTTPTransport())
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        return await http.get(url)


async def _escrow_get(chain: Chain, url: str, journal: Path) -> httpx.Response:
    async with AsyncEscrowClient(dev(BUYER), chain.node.url, journal, timeout=60) as client:
        return await client.get(url)


def test_one_route_sells_exact_to_the_stock_client_and_escrow_to_ours(chain: Chain, tmp_path: Path) -> None:
    with exact_facilitator(chain) as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator))
        with served(shop.app) as (base, _):
            unpaid = localhttp.get(f"{base}/report/a")
            assert unpaid.status_code == 402
            offered = decode_payment_required_header(unpaid.headers["payment-required"]).accepts
            assert [a.scheme for a in offered] == ["delivery-escrow", "exact"]  # the seller's default order
            exact = offered[1]
            assert isinstance(exact, PaymentRequirements)
            assert (exact.asset, exact.amount, exact.pay_to) == (chain.token.address, str(PRICE), address(SELLER))
            assert exact.extra == {"name": "USDC", "version": "2"}

            start = int(chain.w3.eth.block_number) + 1
            seller_before = chain.token.balance_of(address(SELLER))
            stock_before = chain.token.balance_of(address(BUYER2))
            paid = asyncio.run(_stock_get(chain, f"{base}/report/stock"))
            assert paid.status_code == 200 and paid.json()["item"] == "stock"
            settled = decode_payment_response_header(paid.headers["payment-response"])
            assert settled.success and settled.transaction and settled.payer == address(BUYER2)
            receipt = chain.w3.eth.get_transaction_receipt(HexStr(settled.transaction))
            assert receipt["status"] == 1
            # Paid straight to the seller by transferWithAuthorization: no escrow involved.
            assert chain.token.balance_of(address(BUYER2)) == stock_before - PRICE
            assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE
            assert deposits(chain, start) == []

            ours = asyncio.run(_escrow_get(chain, f"{base}/report/ours", tmp_path / "buyer.sqlite"))
            assert ours.status_code == 200 and ours.json()["item"] == "ours"
            (deposit,) = deposits(chain, start)
            # Deposited into the escrow (the poster may already have released it with the delivery hash).
            assert deposit.terms.buyer == address(BUYER)
            assert chain.escrow.state_of(deposit.id) in (State.HELD, State.RELEASED)
            assert shop.calls["report"] == 2


def test_the_seller_orders_the_offers_and_can_leave_exact_out(chain: Chain, tmp_path: Path) -> None:
    with exact_facilitator(chain) as facilitator:
        routes = [
            PricedRoute("GET", "/report/{item}", amount=PRICE),
            PricedRoute("GET", "/fail", amount=PRICE, schemes=("delivery-escrow",)),
        ]
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=routes, exact=ExactOffer(facilitator, first=True))
        with served(shop.app) as (base, _):
            first = decode_payment_required_header(localhttp.get(f"{base}/report/a").headers["payment-required"])
            assert [a.scheme for a in first.accepts] == ["exact", "delivery-escrow"]
            only = decode_payment_required_header(localhttp.get(f"{base}/fail").headers["payment-required"])
            assert [a.scheme for a in only.accepts] == ["delivery-escrow"]
            before = chain.token.balance_of(address(BUYER2))
            with pytest.raises(Exception, match="No payment requirements match"):
                asyncio.run(_stock_get(chain, f"{base}/fail"))
            assert chain.token.balance_of(address(BUYER2)) == before
            assert shop.calls.get("fail", 0) == 0


def test_exact_is_not_settled_when_the_handler_fails_nor_twice_on_replay(chain: Chain, tmp_path: Path) -> None:
    with exact_facilitator(chain) as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator))
        with served(shop.app) as (base, _):
            before = chain.token.balance_of(address(BUYER2))
            failed = asyncio.run(_stock_get(chain, f"{base}/fail"))
            assert failed.status_code == 503 and "payment-response" not in failed.headers
            assert chain.token.balance_of(address(BUYER2)) == before  # the SDK's rule: no settle on >= 400

            captured: list[str] = []

            class Recording(httpx.AsyncHTTPTransport):
                """The wire under the SDK's transport: it sees the retried request with its PAYMENT-SIGNATURE."""

                async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                    if "payment-signature" in request.headers:
                        captured.append(request.headers["payment-signature"])
                    return await super().handle_async_request(request)

            async def pay_then_replay() -> tuple[httpx.Response, httpx.Response]:
                transport = x402_httpx_transport(stock_client(chain, BUYER2), Recording())
                async with httpx.AsyncClient(transport=transport) as http:
                    first = await http.get(f"{base}/report/once")
                async with localhttp.AsyncClient() as plain:
                    again = await plain.get(f"{base}/report/once", headers={"PAYMENT-SIGNATURE": captured[-1]})
                return first, again

            first, again = asyncio.run(pay_then_replay())
            assert first.status_code == 200
            assert again.status_code == 402  # the authorization is spent: the facilitator refuses it
            assert chain.token.balance_of(address(BUYER2)) == before - PRICE


def test_hooks_run_around_both_schemes_and_a_before_hook_aborts(chain: Chain, tmp_path: Path) -> None:
    seen: list[tuple[str, str, str]] = []
    refused = {address(BUYER2)}

    def deny(ctx: Any) -> AbortResult | None:
        payer = ctx.payment_payload.payload.get("authorization", {}).get("from")
        seen.append(("before_verify", ctx.requirements.scheme, str(payer)))
        if payer is not None and payer.lower() in {a.lower() for a in refused}:
            return AbortResult(reason="payer_blocked", message="this payer is blocked here")
        return None

    async def book(ctx: Any) -> None:  # async hooks are awaited, like the SDK's
        seen.append(("after_settle", ctx.requirements.scheme, str(ctx.result.payer)))

    def no_escrow_deposits(ctx: Any) -> AbortResult | None:
        seen.append(("before_settle", ctx.requirements.scheme, ctx.phase))
        return None

    hooks = SellerHooks().on_before_verify(deny).on_before_settle(no_escrow_deposits).on_after_settle(book)
    with exact_facilitator(chain) as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator), hooks=hooks)
        with served(shop.app) as (base, _):
            before = chain.token.balance_of(address(BUYER2))
            blocked = asyncio.run(_stock_get(chain, f"{base}/report/blocked"))
            assert blocked.status_code == 402
            assert "payer_blocked" in str(decode_payment_required_header(blocked.headers["payment-required"]).error)
            assert chain.token.balance_of(address(BUYER2)) == before and "report" not in shop.calls

            start = int(chain.w3.eth.block_number) + 1
            ours = asyncio.run(_escrow_get(chain, f"{base}/report/ours", tmp_path / "b.sqlite"))
            assert ours.status_code == 200 and len(deposits(chain, start)) == 1

            refused.add(address(BUYER))  # now the escrow payer too: refused before any deposit
            start = int(chain.w3.eth.block_number) + 1
            with pytest.raises(PaymentRejected, match="payer_blocked"):
                asyncio.run(_escrow_get(chain, f"{base}/report/again", tmp_path / "c.sqlite"))
            assert deposits(chain, start) == []
            assert shop.calls["report"] == 1

            refused.clear()
            paid = asyncio.run(_stock_get(chain, f"{base}/report/exact"))
            assert paid.status_code == 200
    assert ("after_settle", "delivery-escrow", address(BUYER)) in seen
    assert ("after_settle", "exact", address(BUYER2)) in seen
    assert ("before_settle", "delivery-escrow", "before-handler") in seen
    assert ("before_settle", "exact", "after-handler") in seen
    assert ("before_verify", "exact", address(BUYER2)) in seen


def test_a_tampered_exact_payment_matches_no_offer_and_moves_nothing(chain: Chain, tmp_path: Path) -> None:
    with exact_facilitator(chain) as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator))
        with served(shop.app) as (base, _):

            async def cheaper() -> httpx.Response:
                # The buyer signs an exact payment of 1 unit and claims the offer said so.
                required = decode_payment_required_header(localhttp.get(f"{base}/report/a").headers["payment-required"])
                exact = next(a for a in required.accepts if a.scheme == "exact").model_copy(update={"amount": "1"})
                client = stock_client(chain, BUYER2)
                payload = await client.create_payment_payload(required.model_copy(update={"accepts": [exact]}))
                header = encode_payment_signature_header(payload)
                async with localhttp.AsyncClient() as http:
                    return await http.get(f"{base}/report/a", headers={"PAYMENT-SIGNATURE": header})

            before = chain.token.balance_of(address(BUYER2))
            refused = asyncio.run(cheaper())
            assert refused.status_code == 402
            assert decode_payment_required_header(refused.headers["payment-required"]).error == "requirements_mismatch"
            assert chain.token.balance_of(address(BUYER2)) == before and "report" not in shop.calls


def test_a_facilitator_that_fails_costs_exact_buyers_nothing_and_escrow_still_sells(
    chain: Chain, tmp_path: Path
) -> None:
    with exact_facilitator(chain) as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator))
        with served(shop.app) as (base, _):
            assert (
                len(
                    decode_payment_required_header(
                        localhttp.get(f"{base}/report/a").headers["payment-required"]
                    ).accepts
                )
                == 2
            )
    # The facilitator is gone now; the seller still offers exact (it listed it) but cannot verify it.
    with served(shop.app) as (base, _):
        before = chain.token.balance_of(address(BUYER2))
        down = asyncio.run(_stock_get(chain, f"{base}/report/down"))
        assert down.status_code == 503 and down.json()["error"] == "chain_unavailable"
        assert down.headers["retry-after"] and chain.token.balance_of(address(BUYER2)) == before
        assert "report" not in shop.calls
        ours = asyncio.run(_escrow_get(chain, f"{base}/report/ours", tmp_path / "b.sqlite"))
        assert ours.status_code == 200


def test_a_facilitator_that_never_answered_leaves_exact_out_of_the_402(chain: Chain, tmp_path: Path) -> None:
    gone = HTTPFacilitatorClient(FacilitatorConfig(url=f"http://127.0.0.1:{free_port()}", timeout=5))
    shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(gone))
    with served(shop.app) as (base, _):  # it starts: escrow sells without the facilitator
        required = decode_payment_required_header(localhttp.get(f"{base}/report/a").headers["payment-required"])
        assert [a.scheme for a in required.accepts] == ["delivery-escrow"]
        assert asyncio.run(_escrow_get(chain, f"{base}/report/ours", tmp_path / "b.sqlite")).status_code == 200


def test_a_facilitator_without_exact_on_the_sellers_network_stops_the_start(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with exact_facilitator(chain, network="eip155:8453") as facilitator:
        shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), exact=ExactOffer(facilitator))
        stopped, _ = _failed_start(shop.app)
    assert stopped
    assert "the facilitator does not list exact on eip155:84532" in caplog.text


def test_escrow_hooks_can_refuse_after_verify_and_before_the_deposit(chain: Chain, tmp_path: Path) -> None:
    verdicts: dict[str, AbortResult | None] = {"after_verify": None, "before_settle": None}
    order: list[str] = []

    def after_verify(ctx: Any) -> AbortResult | None:
        order.append(f"after_verify {ctx.result.is_valid} {ctx.result.payer}")
        return verdicts["after_verify"]

    def before_settle(ctx: Any) -> AbortResult | None:
        order.append(f"before_settle {ctx.phase}")
        return verdicts["before_settle"]

    hooks = SellerHooks().on_after_verify(after_verify).on_before_settle(before_settle)
    shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), hooks=hooks)
    start = int(chain.w3.eth.block_number) + 1
    for hook, reason in (("after_verify", "risk_score_too_high"), ("before_settle", "out_of_stock")):
        verdicts = {"after_verify": None, "before_settle": None, hook: AbortResult(reason=reason)}
        with served(shop.app) as (base, _), pytest.raises(PaymentRejected, match=reason):
            asyncio.run(_escrow_get(chain, f"{base}/report/x", tmp_path / f"{hook}.sqlite"))
    assert deposits(chain, start) == [] and "report" not in shop.calls
    assert order == [
        f"after_verify True {address(BUYER)}",
        f"after_verify True {address(BUYER)}",
        "before_settle before-handler",
    ]


def test_an_after_settle_hook_that_raises_does_not_cost_the_buyer_the_sale(chain: Chain, tmp_path: Path) -> None:
    def broken_books(ctx: Any) -> None:
        raise RuntimeError("the accounting database is down")

    shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), hooks=SellerHooks().on_after_settle(broken_books))
    with served(shop.app) as (base, _):
        paid = asyncio.run(_escrow_get(chain, f"{base}/report/x", tmp_path / "b.sqlite"))
    assert paid.status_code == 200 and paid.json()["item"] == "x"


@pytest.mark.parametrize("hook", ["before_verify", "after_verify", "before_settle"])
def test_a_hold_hook_that_raises_is_a_503_that_moves_nothing(chain: Chain, tmp_path: Path, hook: str) -> None:
    calls: dict[str, int] = {}
    books = Books(calls)
    books.raises.add(hook)
    shop = make_shop(chain, tmp_path / "s.sqlite", routes=_routes(), hooks=books.hooks())
    start = int(chain.w3.eth.block_number) + 1

    async def pay() -> tuple[httpx.Response, httpx.Response]:
        async with shop.client() as client:
            payment = sign_payment(chain, await quote(client, "GET", "/report/x"))
            failed = await client.get("/report/x", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
            books.raises.clear()  # the seller fixed its hook: the same payment, sent again, pays once
            return failed, await client.get("/report/x", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    failed, paid = asyncio.run(pay())
    assert failed.status_code == 503 and failed.json()["error"] == Reason.SELLER_HOOK_FAILED
    assert paid.status_code == 200, paid.text
    assert shop.calls == {"report": 1} and len(deposits(chain, start)) == 1  # run once, deposited once


def test_an_sdk_client_with_both_plugins_takes_the_sellers_first_offer(chain: Chain, tmp_path: Path) -> None:
    async def both_get(url: str, journal: Path) -> httpx.Response:
        client = stock_client(chain, BUYER)  # exact, and this project's plugin beside it
        with DeliveryEscrowScheme(dev(BUYER), chain.node.url, journal) as scheme:
            client.register("eip155:84532", scheme)
            transport = x402_httpx_transport(client, localhttp.AsyncHTTPTransport())
            async with httpx.AsyncClient(transport=transport, timeout=60) as http:
                return await http.get(url)

    with exact_facilitator(chain) as facilitator:
        for first, paid_with in ((False, "delivery-escrow"), (True, "exact")):
            offer = ExactOffer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url)), first=first)
            shop = make_shop(chain, tmp_path / f"{first}.sqlite", routes=_routes(), exact=offer)
            start = int(chain.w3.eth.block_number) + 1
            with served(shop.app) as (base, _):
                response = asyncio.run(both_get(f"{base}/report/x", tmp_path / f"b{first}.sqlite"))
            assert response.status_code == 200
            settled = decode_payment_response_header(response.headers["payment-response"])
            scheme = "delivery-escrow" if settled.extra and "escrowId" in settled.extra else "exact"
            assert scheme == paid_with
            assert len(deposits(chain, start)) == (1 if paid_with == "delivery-escrow" else 0)
