"""The seller's verify/settle hooks on serve-first routes, on a real anvil through the ASGI stack.

The SDK's semantics mapped onto serve-first (README, "Hooks"): before/after-verify around the
serve-first checks (signature, terms, balance, a simulation of the pull) before the handler runs;
before-settle after the handler, before the settlement is queued (an abort declines the payment:
402 with the hook's reason, nothing queued, never charged); after-settle from the poster once the
settlement is mined or lost. A hook that raises costs the buyer nothing and moves no money twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from helpers import BUYER, BUYER2, SELLER, STRANGER, address
from x402.schemas import AbortResult

from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_SIGNATURE_HEADER,
    SettlementMode,
)
from escrow_py.seller import PricedRoute
from escrow_py.seller._poster import PostReport
from escrow_py.seller._store import NAMESPACE, PaymentStatus, SettleStatus
from escrow_py.storage import open_database

from .hook_books import Books
from .payer import Payment, quote, sign_payment
from .shop import PRICE, Shop, make_shop

SF = SettlementMode.SERVE_FIRST
LIMITS = {"serve_first_max_price": PRICE, "serve_first_max_per_buyer": 3 * PRICE, "serve_first_max_total": 10 * PRICE}


def _shop(chain: Chain, tmp_path: Path, *, fallback: bool = False, **overrides: Any) -> tuple[Shop, Books]:
    chain.mine()
    routes = [PricedRoute("GET", "/report/{item}", amount=PRICE, settlement=SF, fallback_to_hold=fallback)]
    calls: dict[str, int] = {}
    books = Books(calls)
    settings: dict[str, Any] = {"routes": routes, **LIMITS, "poster_interval": 3600.0, "hooks": books.hooks()}
    settings.update(overrides)
    shop = make_shop(chain, tmp_path / "seller.sqlite", **settings)
    shop.calls = calls
    return shop, books


async def _pay(shop: Shop, chain: Chain, path: str, buyer: int = BUYER) -> tuple[httpx.Response, Payment]:
    async with shop.client() as client:
        payment = sign_payment(chain, await quote(client, "GET", path), buyer=buyer)
        return await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: payment.header}), payment


async def _send(shop: Shop, path: str, payment: Payment) -> httpx.Response:
    async with shop.client() as client:
        return await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: payment.header})


def _flush(shop: Shop) -> PostReport:
    return asyncio.run(shop.middleware.poster.flush(force_settle=True))


def _block(chain: Chain) -> int:
    return int(chain.w3.eth.block_number)


def test_serve_first_runs_the_hooks_around_its_checks_the_handler_and_the_settlement(
    chain: Chain, tmp_path: Path
) -> None:
    shop, books = _shop(chain, tmp_path)
    handler_runs_at_before_settle: list[int] = []
    books.answer["before_settle"] = None
    original = books.hook("before_settle")

    async def before_settle(context: Any) -> Any:
        handler_runs_at_before_settle.append(shop.calls.get("report", 0))
        return await original(context)

    shop.config.hooks.before_settle[:] = [before_settle]  # type: ignore[union-attr]
    start = _block(chain)
    response, payment = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 200, response.text
    assert _block(chain) == start  # served first: no transaction yet
    # The SDK's order, mapped: verify around the serve-first checks, before the handler; settle after it.
    assert books.names() == ["before_verify", "after_verify", "before_settle"]
    assert handler_runs_at_before_settle == [1]
    verified = books.context("after_verify")
    assert verified.result.is_valid and verified.result.payer == address(BUYER)
    assert verified.requirements.extra["settlement"] == SF
    settle = books.context("before_settle")
    assert settle.phase == "after-handler" and settle.payment_payload.payload["terms"]["buyer"] == address(BUYER)
    assert settle.transport_context.request.path == "/report/x"

    report = _flush(shop)
    (tx,) = report.settle_txs
    assert books.names()[-1] == "after_settle"
    settled = books.context("after_settle")
    assert settled.result.success and settled.result.transaction == "0x" + tx.hex()
    assert settled.result.payer == address(BUYER) and settled.phase == "after-handler"
    assert settled.result.extra["escrowId"] == "0x" + payment.escrow_id.hex()
    assert settled.result.extra["deliveryHash"] == "0x" + delivery_hash(response.content).hex()
    assert settled.payment_payload.accepted.scheme == "delivery-escrow"  # the envelope the buyer sent, kept
    assert settled.transport_context is None  # run by the poster, after the request has gone
    assert _flush(shop).settle_txs == [] and books.names().count("after_settle") == 1  # once per outcome


@pytest.mark.parametrize("hook", ["before_verify", "after_verify"])
def test_a_verify_hook_refuses_serve_first_before_anything_is_recorded_or_run(
    chain: Chain, tmp_path: Path, hook: str
) -> None:
    shop, books = _shop(chain, tmp_path)
    books.answer[hook] = AbortResult(reason="payer_blocked", message="not served here")
    start = _block(chain)
    response, payment = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 402 and response.json()["error"] == "payer_blocked"
    assert "report" not in shop.calls  # the handler never ran
    store = shop.middleware.store
    assert store.payment(payment.escrow_id) is None and store.exposure() == 0  # nothing recorded or reserved
    assert _flush(shop).settle_txs == [] and _block(chain) == start
    assert "before_settle" not in books.names() and "after_settle" not in books.names()


def test_a_before_settle_abort_after_the_handler_declines_the_payment(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The seller chose not to collect: recorded as declined, nothing queued, never charged; the buyer gets
    the SDK's answer to an aborted settlement (402 with the hook's reason, the handler's bytes withheld)."""
    shop, books = _shop(chain, tmp_path)
    books.answer["before_settle"] = AbortResult(reason="out_of_stock")
    buyer_before = chain.token.balance_of(address(BUYER))
    start = _block(chain)
    with caplog.at_level(logging.INFO, logger="escrow_py.seller.sales"):
        response, payment = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 402 and response.json()["error"] == "out_of_stock"
    sales = [(getattr(r, "sale", None), getattr(r, "reason", None)) for r in caplog.records if hasattr(r, "sale")]
    assert sales == [("declined", "out_of_stock")]
    assert b'"item"' not in response.content  # the handler's response did not leave
    assert shop.calls["report"] == 1
    store = shop.middleware.store
    row, record = store.payment(payment.escrow_id), store.settlement(payment.escrow_id)
    assert (
        row is not None
        and row.status == PaymentStatus.DECLINED
        and row.declined == "out_of_stock"
        and row.response is None
    )
    assert record is not None and (record.status, record.reason) == (SettleStatus.DECLINED, "out_of_stock")
    assert store.exposure() == 0 and store.settlements_due() == []

    # The same payment again is refused the same way: not served for free, not run again, not settled.
    again = asyncio.run(_send(shop, "/report/x", payment))
    assert again.status_code == 402 and again.json()["error"] == "out_of_stock"
    assert shop.calls["report"] == 1
    assert _flush(shop).settle_txs == [] and _block(chain) == start
    assert "after_settle" not in books.names()
    assert not chain.token.authorization_state(address(BUYER), payment.escrow_id)
    assert chain.token.balance_of(address(BUYER)) == buyer_before


@pytest.mark.parametrize("hook", ["before_verify", "after_verify", "before_settle"])
def test_a_hook_that_raises_costs_nothing_and_the_same_payment_pays_once_later(
    chain: Chain, tmp_path: Path, hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    shop, books = _shop(chain, tmp_path)
    books.raises.add(hook)
    seller_before = chain.token.balance_of(address(SELLER))
    start = _block(chain)
    with caplog.at_level(logging.ERROR, logger="escrow_py.seller"):
        response, payment = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 503 and response.json()["error"] == Reason.SELLER_HOOK_FAILED
    assert response.headers["retry-after"] == "5"
    assert "database is down" not in response.text  # the exception's text stays in the seller's log
    assert any("hook raised" in r.getMessage() for r in caplog.records)
    store = shop.middleware.store
    assert store.payment(payment.escrow_id) is None and store.exposure() == 0  # nothing kept half-done
    assert _flush(shop).settle_txs == [] and _block(chain) == start

    books.raises.clear()  # the seller fixed its hook; the buyer sends the same payment again
    paid = asyncio.run(_send(shop, "/report/x", payment))
    assert paid.status_code == 200, paid.text
    assert len(_flush(shop).settled_first) == 1
    assert _flush(shop).settle_txs == []
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE  # paid once


def test_an_after_settle_hook_that_raises_leaves_the_settlement_recorded_and_sent_once(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shop, books = _shop(chain, tmp_path)
    books.raises.add("after_settle")
    seller_before = chain.token.balance_of(address(SELLER))
    response, payment = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 200
    with caplog.at_level(logging.ERROR, logger="escrow_py.seller"):
        report = _flush(shop)
    assert report.settled_first == [payment.escrow_id]
    assert any("after-settle hook raised" in r.getMessage() and payment.escrow_id.hex() in r.getMessage()
               for r in caplog.records)  # fmt: skip
    record = shop.middleware.store.settlement(payment.escrow_id)
    assert record is not None and record.status == "settled"
    assert _flush(shop).settle_txs == []  # the poster goes on; nothing is sent again
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE


def test_after_settle_reports_a_lost_settlement_with_why(chain: Chain, tmp_path: Path) -> None:
    shop, books = _shop(chain, tmp_path)
    response, payment = asyncio.run(_pay(shop, chain, "/report/cheat", buyer=BUYER2))
    assert response.status_code == 200
    balance = chain.token.balance_of(address(BUYER2))
    chain.token.transfer(chain.sender(BUYER2), address(STRANGER), balance)  # the buyer empties its wallet
    try:
        assert _flush(shop).lost == [payment.escrow_id]
        lost = books.context("after_settle")
        assert not lost.result.success and lost.result.error_reason == Reason.SETTLEMENT_FAILED
        assert lost.result.error_message and lost.result.payer == address(BUYER2)
    finally:
        chain.token.transfer(chain.sender(STRANGER), address(BUYER2), balance)


def test_a_serve_first_payment_falling_back_to_hold_runs_each_hook_once(chain: Chain, tmp_path: Path) -> None:
    shop, books = _shop(chain, tmp_path, fallback=True, serve_first_max_per_buyer=PRICE, serve_first_max_total=PRICE)
    assert asyncio.run(_pay(shop, chain, "/report/first"))[0].status_code == 200  # served first: the limit is full
    books.seen.clear()
    response, _ = asyncio.run(_pay(shop, chain, "/report/x"))
    assert response.status_code == 200, response.text
    assert books.names() == ["before_verify", "after_verify", "before_settle", "after_settle"]
    assert books.context("before_settle").phase == "before-handler"  # hold's settle is the deposit
    assert books.context("after_settle").result.transaction.startswith("0x")  # the deposit


def test_a_settlement_queued_by_an_older_version_still_settles(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records written before serve-first kept the buyer's envelope hold the EscrowPayload alone: the poster
    still settles them (once); only the after-settle hooks, which need the envelope, are skipped, with a warning."""
    shop, books = _shop(chain, tmp_path)
    response, payment = asyncio.run(_pay(shop, chain, "/report/old"))
    assert response.status_code == 200
    store = shop.middleware.store
    row = store.settlement(payment.escrow_id)
    assert row is not None and row.payload is not None and "accepted" in json.loads(row.payload)
    alone = json.dumps(json.loads(row.payload)["payload"])  # what the older version stored
    db = open_database(f"sqlite:///{tmp_path / 'seller.sqlite'}", NAMESPACE)
    try:
        with db.transaction() as tx:
            tx.execute("UPDATE settlements SET payload = ? WHERE escrow_id = ?", (alone, payment.escrow_id))
    finally:
        db.close()
    with caplog.at_level(logging.WARNING, logger="escrow_py.seller.poster"):
        assert _flush(shop).settled_first == [payment.escrow_id]
    assert "after_settle" not in books.names()
    assert any("after-settle hooks skipped" in r.getMessage() for r in caplog.records)
    assert _flush(shop).settle_txs == []
