"""Serve-first on a real anvil through the ASGI stack: answered before any transaction, settled in one
settleMany, exposure limits, a buyer who moves its funds, a failed handler, replays (DESIGN.md section 8)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, BUYER2, SELLER, STRANGER, address

from escrow_py.chain.escrow import Settled
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowRequirements,
    SettlementExtra,
    SettlementMode,
    SettlementStatus,
    decode_payment_response,
)
from escrow_py.seller import PricedRoute
from escrow_py.seller._poster import PostReport

from .payer import Payment, buy, quote, sign_payment
from .shop import PRICE, ProcessDied, Shop, make_config, make_shop

SF = SettlementMode.SERVE_FIRST
LIMITS = {"serve_first_max_price": PRICE, "serve_first_max_per_buyer": 3 * PRICE, "serve_first_max_total": 10 * PRICE}


def _routes(*, fallback: bool = True) -> list[PricedRoute]:
    return [
        PricedRoute("GET", "/report/{item}", amount=PRICE, settlement=SF, fallback_to_hold=fallback),
        PricedRoute("POST", "/echo", amount=PRICE, settlement=SF, fallback_to_hold=False),
        PricedRoute("GET", "/fail", amount=PRICE, settlement=SF),
        PricedRoute("GET", "/boom", amount=PRICE, settlement=SF),
        PricedRoute("GET", "/crashy", amount=PRICE, settlement=SF),
    ]


def _shop(chain: Chain, tmp_path: Path, **overrides: Any) -> Shop:
    chain.mine()
    settings: dict[str, Any] = {"routes": _routes(), **LIMITS, "poster_interval": 3600.0}
    settings.update(overrides)
    return make_shop(chain, tmp_path / "seller.sqlite", **settings)


def _extra(response: httpx.Response) -> tuple[Any, SettlementExtra]:
    settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
    return settle, SettlementExtra.from_json(settle.extra)


def _block(chain: Chain) -> int:
    return int(chain.w3.eth.block_number)


async def _buy(shop: Shop, chain: Chain, path: str, buyer: int = BUYER) -> tuple[httpx.Response, Payment]:
    async with shop.client() as client:
        return await buy(client, chain, "GET", path, buyer=buyer)


def _flush(shop: Shop) -> PostReport:
    return asyncio.run(shop.middleware.poster.flush())


def _fund(chain: Chain, who: int, amount: int = 10**9) -> None:
    chain.token.mint(chain.deployer, address(who), amount)


def test_serve_first_answers_before_any_transaction_and_one_settle_many_pays_them_all(
    chain: Chain, tmp_path: Path
) -> None:
    shop = _shop(chain, tmp_path)
    _fund(chain, STRANGER)
    buyers = (BUYER, BUYER2, STRANGER)
    before = {who: chain.token.balance_of(address(who)) for who in (*buyers, SELLER)}

    async def burst() -> list[tuple[httpx.Response, Payment]]:
        async with shop.client() as client:
            required = await quote(client, "GET", "/report/x")
            assert EscrowRequirements.from_model(required.accepts[0]).extra.settlement is SF
            return [await buy(client, chain, "GET", f"/report/{who}", buyer=who) for who in buyers]

    start = _block(chain)
    answers = asyncio.run(burst())
    assert _block(chain) == start  # every buyer has its bytes and not one transaction was sent
    for (response, payment), who in zip(answers, buyers, strict=True):
        assert response.status_code == 200
        assert response.json()["item"] == str(who)
        settle, extra = _extra(response)
        assert settle.success and settle.transaction == ""
        assert extra.settlement is SettlementStatus.PENDING
        assert extra.delivery_hash == delivery_hash(response.content)
        assert not chain.token.authorization_state(address(who), payment.escrow_id)
    assert shop.middleware.store.exposure() == 3 * PRICE

    report = _flush(shop)
    (tx,) = report.settle_txs  # one settleMany for the whole burst
    assert sorted(report.settled_first) == sorted(p.escrow_id for _, p in answers)
    assert _block(chain) == start + 1
    receipt = chain.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
    settled = {e.id: e.delivery_hash for e in chain.escrow.settlements_in(receipt) if isinstance(e, Settled)}
    assert settled == {p.escrow_id: delivery_hash(r.content) for r, p in answers}
    for _, payment in answers:
        assert chain.escrow.state_of(payment.escrow_id) is State.NONE  # a settled id takes no slot
        assert chain.token.authorization_state(payment.terms.buyer, payment.escrow_id)
    for who in buyers:
        assert chain.token.balance_of(address(who)) == before[who] - PRICE
    assert chain.token.balance_of(address(SELLER)) == before[SELLER] + 3 * PRICE
    assert shop.middleware.store.exposure() == 0
    assert _flush(shop).settle_txs == []  # nothing is settled twice

    # A replay: the stored bytes, the handler not run again, the settlement named.
    response, payment = answers[0]
    calls = shop.calls["report"]

    async def replay() -> httpx.Response:
        async with shop.client() as client:
            return await client.get(f"/report/{BUYER}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    again = asyncio.run(replay())
    assert again.content == response.content
    assert shop.calls["report"] == calls
    settle, extra = _extra(again)
    assert extra.settlement is SettlementStatus.SETTLED
    assert settle.transaction == "0x" + tx.hex()


def test_exposure_limits_fall_back_to_hold_or_refuse_with_a_reason(chain: Chain, tmp_path: Path) -> None:
    limits = {"serve_first_max_per_buyer": PRICE, "serve_first_max_total": 2 * PRICE}
    shop = _shop(chain, tmp_path, **limits)
    _fund(chain, STRANGER)

    first, _ = asyncio.run(_buy(shop, chain, "/report/a"))
    assert _extra(first)[1].settlement is SettlementStatus.PENDING
    # BUYER owes PRICE unsettled: its per-buyer limit is reached, so it is served in hold mode.
    held, payment = asyncio.run(_buy(shop, chain, "/report/b"))
    settle, extra = _extra(held)
    assert held.status_code == 200 and extra.settlement is SettlementStatus.HELD
    assert settle.transaction != ""
    assert chain.escrow.state_of(payment.escrow_id) is State.HELD
    # BUYER2 fits the total (2 * PRICE); then everyone's total is reached for STRANGER.
    assert _extra(asyncio.run(_buy(shop, chain, "/report/c", BUYER2))[0])[1].settlement is SettlementStatus.PENDING
    third, payment = asyncio.run(_buy(shop, chain, "/report/d", STRANGER))
    assert _extra(third)[1].settlement is SettlementStatus.HELD
    assert chain.escrow.state_of(payment.escrow_id) is State.HELD
    assert shop.middleware.store.exposure() == 2 * PRICE

    # A route that does not fall back answers 402 with the reason, and nothing moves.
    async def echo() -> httpx.Response:
        async with shop.client() as client:
            return (await buy(client, chain, "POST", "/echo", b"hi", buyer=STRANGER))[0]

    start = _block(chain)
    refused = asyncio.run(echo())
    assert refused.status_code == 402
    assert refused.json()["error"] == Reason.SERVE_FIRST_LIMIT
    assert _block(chain) == start
    assert "echo" not in shop.calls

    # Settled, the exposure is free again: serve-first resumes.
    assert len(_flush(shop).settled_first) == 2
    assert shop.middleware.store.exposure() == 0
    assert _extra(asyncio.run(_buy(shop, chain, "/report/e"))[0])[1].settlement is SettlementStatus.PENDING


def test_a_buyer_who_moves_its_funds_is_skipped_recorded_as_a_loss_and_refused_serve_first(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shop = _shop(chain, tmp_path)
    honest, _ = asyncio.run(_buy(shop, chain, "/report/honest", BUYER))
    cheat, payment = asyncio.run(_buy(shop, chain, "/report/cheat", BUYER2))
    assert _extra(cheat)[1].settlement is SettlementStatus.PENDING
    # Having the bytes, the buyer empties its wallet before the settlement.
    balance = chain.token.balance_of(address(BUYER2))
    chain.token.transfer(chain.sender(BUYER2), address(STRANGER), balance)
    seller_before = chain.token.balance_of(address(SELLER))

    with caplog.at_level(logging.ERROR, logger="escrow_py.seller.poster"):
        report = _flush(shop)
    assert report.lost == [payment.escrow_id]
    assert len(report.settled_first) == 1  # the honest buyer's entry settles in the same batch
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE
    assert any("skipped" in r.getMessage() and payment.escrow_id.hex() in r.getMessage() for r in caplog.records)
    losses = shop.middleware.store.losses()
    assert (losses.count, losses.amount, losses.refused_buyers) == (1, PRICE, frozenset({address(BUYER2)}))
    assert shop.middleware.store.exposure() == 0

    # Funded again, the buyer is served in hold mode only, or refused on a route without fallback.
    chain.token.transfer(chain.sender(STRANGER), address(BUYER2), balance)
    again, payment2 = asyncio.run(_buy(shop, chain, "/report/again", BUYER2))
    assert _extra(again)[1].settlement is SettlementStatus.HELD
    assert chain.escrow.state_of(payment2.escrow_id) is State.HELD

    async def echo() -> httpx.Response:
        async with shop.client() as client:
            return (await buy(client, chain, "POST", "/echo", b"x", buyer=BUYER2))[0]

    refused = asyncio.run(echo())
    assert refused.status_code == 402 and refused.json()["error"] == Reason.SERVE_FIRST_REFUSED

    # The replay of the unpaid payment still answers the stored bytes, and says it failed.
    async def replay() -> httpx.Response:
        async with shop.client() as client:
            return await client.get("/report/cheat", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    replayed = asyncio.run(replay())
    assert replayed.content == cheat.content
    settle, extra = _extra(replayed)
    assert extra.settlement is None and extra.delivery_hash == delivery_hash(cheat.content)
    assert not settle.success and settle.error_reason == Reason.SETTLEMENT_FAILED
    assert honest.status_code == 200


@pytest.mark.parametrize("path", ["/fail", "/boom"])
def test_a_failed_handler_costs_nobody_anything(chain: Chain, tmp_path: Path, path: str) -> None:
    shop = _shop(chain, tmp_path)
    start = _block(chain)
    response, payment = asyncio.run(_buy(shop, chain, path))
    assert response.status_code >= 500
    settle, extra = _extra(response)
    assert not settle.success and settle.error_reason == Reason.HANDLER_FAILED_NOT_CHARGED
    assert settle.transaction == "" and extra.delivery_hash is None
    assert shop.middleware.store.payment(payment.escrow_id) is None
    assert shop.middleware.store.exposure() == 0
    assert _flush(shop).settle_txs == []
    assert _block(chain) == start  # no transaction at all: no deposit, no refund, no settlement
    assert not chain.token.authorization_state(address(BUYER), payment.escrow_id)


def test_serve_first_refuses_what_hold_refuses_before_the_handler_runs(chain: Chain, tmp_path: Path) -> None:
    shop = _shop(chain, tmp_path)

    # Signed, then the wallet emptied before the paid request: refused before the handler, like hold.
    async def run() -> httpx.Response:
        async with shop.client() as client:
            required = await quote(client, "GET", "/report/empty")
            payment = sign_payment(chain, required)
            chain.token.transfer(chain.sender(BUYER), address(STRANGER), chain.token.balance_of(address(BUYER)))
            return await client.get("/report/empty", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    response = asyncio.run(run())
    assert response.status_code == 402
    assert response.json()["error"] == Reason.INSUFFICIENT_BALANCE
    assert "report" not in shop.calls


def test_a_settlement_whose_pull_would_revert_is_refused_with_the_revert_before_the_handler(
    chain: Chain, tmp_path: Path
) -> None:
    """Balance and authorization fine, the pull itself reverts (the token blocks the escrow as a recipient):
    the eth_call of the settlement says so, decoded, and nothing is served or queued."""
    token = chain.deploy_token("BlockingToken")
    shop = _shop(chain, tmp_path, token=token.address)
    set_blocked = keccak(text="setBlocked(address)")[:4] + bytes(12) + bytes.fromhex(chain.escrow.address[2:])
    chain.deployer.transact(token.address, set_blocked)

    async def run() -> httpx.Response:
        async with shop.client() as client:
            response, _ = await buy(client, chain, "GET", "/report/frozen")
            return response

    response = asyncio.run(run())
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error == f"{Reason.SIMULATION_FAILED}: RecipientBlocked(to={chain.escrow.address})", error
    assert "report" not in shop.calls
    assert shop.middleware.store.settlements_due() == [] and shop.middleware.store.exposure() == 0


def test_serve_first_settings_are_checked_when_built(chain: Chain, tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    route = PricedRoute("GET", "/r", amount=PRICE, settlement="serve-first")
    with pytest.raises(ConfigError, match="serve_first_max_price, serve_first_max_per_buyer, serve_first_max_total"):
        make_config(chain, store, routes=[route])
    with pytest.raises(ConfigError, match="serve-first at 10000, more than serve_first_max_price 9999"):
        make_config(chain, store, routes=[route], **{**LIMITS, "serve_first_max_price": 9999})
    with pytest.raises(ConfigError, match="serve_first_max_per_buyer 30000 exceeds serve_first_max_total 20000"):
        make_config(chain, store, routes=[route], **{**LIMITS, "serve_first_max_total": 2 * PRICE})
    with pytest.raises(ConfigError, match="serve_first_max_total must be a positive integer"):
        make_config(chain, store, routes=[route], **{**LIMITS, "serve_first_max_total": 0})
    with pytest.raises(ConfigError, match=r"PricedRoute\.settlement must be one of"):
        PricedRoute("GET", "/r", amount=PRICE, settlement="later")
    # Hold routes need none of it, and a serve-first route within its limits is fine.
    assert make_config(chain, store).routes[0].settlement is SettlementMode.HOLD
    assert make_config(chain, store, routes=[route], **LIMITS).routes[0].serve_first


def test_settle_batch_wait_holds_settlements_back_to_batch_them(chain: Chain, tmp_path: Path) -> None:
    shop = _shop(chain, tmp_path, settle_batch_wait=5.0)
    ids = [asyncio.run(_buy(shop, chain, f"/report/{i}", who))[1].escrow_id for i, who in enumerate((BUYER, BUYER2))]
    assert _flush(shop).settle_txs == []  # the oldest has not waited 5 s: more may join
    report = asyncio.run(shop.middleware.poster.flush(force_settle=True))  # what a shutdown does
    assert len(report.settle_txs) == 1 and sorted(report.settled_first) == sorted(ids)
    with pytest.raises(ConfigError, match="settle_batch_wait must be seconds >= 0 and below min_time_left 10"):
        make_config(chain, tmp_path / "s.sqlite", routes=_routes(), settle_batch_wait=10, **LIMITS)


def test_concurrent_requests_cannot_overshoot_the_per_buyer_limit(chain: Chain, tmp_path: Path) -> None:
    shop = _shop(chain, tmp_path)  # BUYER may owe at most 3 * PRICE unsettled

    async def burst() -> list[httpx.Response]:
        async with shop.client() as client:
            requireds = [await quote(client, "GET", f"/report/c{i}") for i in range(8)]
            payments = [sign_payment(chain, r) for r in requireds]
            return list(
                await asyncio.gather(
                    *(
                        client.get(f"/report/c{i}", headers={PAYMENT_SIGNATURE_HEADER: p.header})
                        for i, p in enumerate(payments)
                    )
                )
            )

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    modes = [_extra(r)[1].settlement for r in answers]
    assert modes.count(SettlementStatus.PENDING) == 3
    assert modes.count(SettlementStatus.HELD) == 5
    assert shop.middleware.store.exposure(address(BUYER)) == 3 * PRICE


def test_a_payment_that_rewrites_the_settlement_mode_is_refused(chain: Chain, tmp_path: Path) -> None:
    shop = _shop(chain, tmp_path)

    def to_hold(envelope: dict[str, Any]) -> None:
        envelope["accepted"]["extra"]["settlement"] = "hold"

    def to_nonsense(envelope: dict[str, Any]) -> None:
        envelope["accepted"]["extra"]["settlement"] = "never"

    async def pay(tamper: Any) -> httpx.Response:
        async with shop.client() as client:
            return (await buy(client, chain, "GET", "/report/t", tamper=tamper))[0]

    start = _block(chain)
    assert asyncio.run(pay(to_hold)).json()["error"] == Reason.REQUIREMENTS_MISMATCH
    nonsense = asyncio.run(pay(to_nonsense))
    assert nonsense.status_code == 400 and nonsense.json()["error"] == Reason.INVALID_PAYLOAD
    assert _block(chain) == start and "report" not in shop.calls


def test_a_seller_that_died_mid_handler_serves_the_replay_first(chain: Chain, tmp_path: Path) -> None:
    shop = _shop(chain, tmp_path)
    shop.crash_next = True

    async def pay() -> Payment:
        async with shop.client() as client:
            required = await quote(client, "GET", "/crashy")
            payment = sign_payment(chain, required)
            with pytest.raises(ProcessDied):
                await client.get("/crashy", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
            return payment

    payment = asyncio.run(pay())
    assert shop.middleware.store.exposure() == PRICE  # recorded, exposure reserved, nothing answered
    shop.crash_next = False

    async def replay() -> httpx.Response:
        async with shop.client() as client:
            return await client.get("/crashy", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    response = asyncio.run(replay())
    assert response.status_code == 200 and response.json() == {"served": "after the crash"}
    assert _extra(response)[1].settlement is SettlementStatus.PENDING
    assert _flush(shop).settled_first == [payment.escrow_id]
    assert shop.calls["crashy"] == 2
