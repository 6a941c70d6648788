"""The seller's verify/settle hooks in facilitator mode: a keyless seller (FacilitatorMiddleware on uvicorn)
and a real facilitator (uvicorn, its own SQLite, the session's anvil).

Serve-first: before/after-verify around the facilitator's /verify, before-settle after the handler and before
the settlement is queued for /settle, after-settle from the outbox once the facilitator says settled or lost.
Hold: before/after-verify around /verify, before-settle before /settle (the deposit), after-settle after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import localhttp
import pytest
from fastapi import FastAPI
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address
from seller.hook_books import Books
from seller.payer import Payment, quote, sign_payment
from seller.shop import served
from x402.schemas import AbortResult

from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import delivery_hash
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER
from escrow_py.seller import FacilitatorMiddleware, FacilitatorSellerConfig, PricedRoute
from escrow_py.seller._store import PaymentStatus, SellerStore, SettleStatus

from .kit import Fac, settled_on_chain
from .test_api import wait_for
from .test_serve_first import PRICE, SF


@dataclass
class Seller:
    """The keyless seller on uvicorn, and the hooks it runs."""

    url: str
    store: Path
    books: Books


@pytest.fixture
def seller(chain: Chain, fac: Fac, tmp_path: Path) -> Iterator[Seller]:
    app = FastAPI()
    calls: dict[str, int] = {}
    books = Books(calls)

    @app.get("/fast/{item}")
    async def fast(item: str) -> dict[str, object]:
        calls["fast"] = calls.get("fast", 0) + 1
        return {"item": item}

    @app.get("/held/{item}")
    async def held(item: str) -> dict[str, str]:
        calls["held"] = calls.get("held", 0) + 1
        return {"held": item}

    routes = [
        PricedRoute("GET", "/fast/{item}", amount=PRICE, settlement=SF, fallback_to_hold=False),
        PricedRoute("GET", "/held/{item}", amount=PRICE),
    ]
    store = tmp_path / "seller.sqlite"
    config = FacilitatorSellerConfig(
        facilitator_url=fac.url, api_key=fac.key, network="eip155:84532", token=chain.token.address,
        pay_to=address(SELLER), routes=routes, store=store, outbox_interval=0.2, hooks=books.hooks(),
        serve_first_max_price=PRICE, serve_first_max_per_buyer=5 * PRICE, serve_first_max_total=10 * PRICE,
    )  # fmt: skip
    app.add_middleware(FacilitatorMiddleware, config=config)
    with served(app) as (url, _server):
        yield Seller(url, store, books)


async def _pay(seller: Seller, chain: Chain, path: str) -> tuple[httpx.Response, Payment]:
    async with localhttp.AsyncClient(base_url=seller.url, timeout=60) as client:
        payment = sign_payment(chain, await quote(client, "GET", path))
        return await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: payment.header}), payment


def _send(seller: Seller, path: str, payment: Payment) -> httpx.Response:
    return localhttp.get(f"{seller.url}{path}", headers={PAYMENT_SIGNATURE_HEADER: payment.header}, timeout=60)


def test_serve_first_hooks_run_around_verify_the_handler_and_the_facilitators_settlement(
    chain: Chain, seller: Seller
) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    books = seller.books
    response, payment = asyncio.run(_pay(seller, chain, "/fast/x"))
    assert response.status_code == 200, response.text
    assert books.names()[:3] == ["before_verify", "after_verify", "before_settle"]
    assert books.calls["fast"] == 1 and books.context("before_settle").phase == "after-handler"
    assert books.context("after_verify").result.payer == address(BUYER)

    wait_for(lambda: "after_settle" in books.names(), timeout=60)  # from the outbox, once the facilitator settled
    settled = books.context("after_settle")
    assert settled.result.success and settled.result.transaction.startswith("0x")
    assert settled.result.extra["deliveryHash"] == "0x" + delivery_hash(response.content).hex()
    assert settled_on_chain(chain, start).get(payment.escrow_id) == delivery_hash(response.content)
    assert settled.payment_payload.accepted.extra["settlement"] == SF


def test_a_before_verify_abort_refuses_before_the_facilitator_hears_of_it(
    chain: Chain, fac: Fac, seller: Seller
) -> None:
    seller.books.answer["before_verify"] = AbortResult(reason="payer_blocked")
    response, payment = asyncio.run(_pay(seller, chain, "/fast/x"))
    assert response.status_code == 402 and response.json()["error"] == "payer_blocked"
    assert "fast" not in seller.books.calls
    assert seller.books.names() == ["before_verify"]  # no /verify, no handler, no settlement
    assert fac.facilitator.store.payment(payment.escrow_id) is None


def test_a_before_settle_abort_declines_and_the_facilitator_never_settles_it(
    chain: Chain, fac: Fac, seller: Seller
) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))
    seller.books.answer["before_settle"] = AbortResult(reason="out_of_stock")
    response, payment = asyncio.run(_pay(seller, chain, "/fast/x"))
    assert response.status_code == 402 and response.json()["error"] == "out_of_stock"
    assert seller.books.calls["fast"] == 1
    again = _send(seller, "/fast/x", payment)  # a replay: refused the same way, the handler not run again
    assert again.status_code == 402 and again.json()["error"] == "out_of_stock"
    assert seller.books.calls["fast"] == 1
    store = SellerStore(seller.store)
    try:
        row = store.payment(payment.escrow_id)
        assert row is not None and row.status == PaymentStatus.DECLINED and store.settlements_due() == []
    finally:
        store.close()
    assert fac.facilitator.store.settlement(payment.escrow_id) is None  # never handed to /settle
    chain.mine()
    assert not chain.token.authorization_state(address(BUYER), payment.escrow_id)
    assert chain.token.balance_of(address(BUYER)) == buyer_before


def test_a_before_settle_hook_that_raises_costs_nothing_and_the_same_payment_pays_once(
    chain: Chain, fac: Fac, seller: Seller
) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    seller_before = chain.token.balance_of(address(SELLER))
    seller.books.raises.add("before_settle")
    response, payment = asyncio.run(_pay(seller, chain, "/fast/x"))
    assert response.status_code == 503 and response.json()["error"] == Reason.SELLER_HOOK_FAILED
    assert fac.facilitator.store.settlement(payment.escrow_id) is None
    seller.books.raises.clear()
    paid = _send(seller, "/fast/x", payment)
    assert paid.status_code == 200, paid.text
    wait_for(lambda: payment.escrow_id in settled_on_chain(chain, start), timeout=60)
    wait_for(lambda: "after_settle" in seller.books.names(), timeout=30)
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE  # paid once
    assert len(settled_on_chain(chain, start)) == 1


def test_hold_routes_in_facilitator_mode_run_the_hooks_around_verify_and_the_deposit(
    chain: Chain, seller: Seller
) -> None:
    books = seller.books
    response, _ = asyncio.run(_pay(seller, chain, "/held/1"))
    assert response.status_code == 200, response.text
    assert books.names() == ["before_verify", "after_verify", "before_settle", "after_settle"]
    assert books.context("before_settle").phase == "before-handler"  # hold's settle is the deposit, before serving
    assert books.context("after_settle").result.transaction.startswith("0x")

    books.seen.clear()
    books.answer["before_settle"] = AbortResult(reason="out_of_stock")
    refused, payment = asyncio.run(_pay(seller, chain, "/held/2"))
    assert refused.status_code == 402 and refused.json()["error"] == "out_of_stock"
    assert books.calls["held"] == 1 and chain.escrow.state_of(payment.escrow_id).name == "NONE"  # nothing deposited


def test_an_after_settle_hook_that_raises_in_the_outbox_leaves_the_settlement_recorded_once(
    chain: Chain, seller: Seller
) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    seller_before = chain.token.balance_of(address(SELLER))
    seller.books.raises.add("after_settle")
    response, payment = asyncio.run(_pay(seller, chain, "/fast/x"))
    assert response.status_code == 200, response.text
    wait_for(lambda: "after_settle" in seller.books.names(), timeout=60)  # it ran, and raised
    store = SellerStore(seller.store)
    try:
        record = store.settlement(payment.escrow_id)
        assert record is not None and record.status == SettleStatus.SETTLED  # recorded before the hook ran
    finally:
        store.close()
    time.sleep(1.0)  # several more outbox passes: none hands it over again nor runs its hooks again
    assert seller.books.names().count("after_settle") == 1
    assert list(settled_on_chain(chain, start)) == [payment.escrow_id]
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE
