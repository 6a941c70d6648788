"""The seller's own transactions failing, over a real uvicorn and the session anvil.

The buyer is not at fault when the operator key has no gas, when its nonce was taken
by someone else, or when a deposit is not mined in time: each is a 503 with Retry-After
and a reason of its own, never a 402 and never a request held for minutes. A deposit that
the chain refuses is the buyer's failure: a 402 whose `error` carries the revert, logged
with the escrow id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import OPERATOR, STRANGER, address, dev, no_automine, pending_of, rpc, until
from rpc_proxy import RpcProxy

from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER, decode_payment_response

from .payer import Payment, buy, quote, sign_payment
from .shop import Shop, deposits, make_shop, served, set_gas_money


def _pay(url: str, path: str, payment: Payment) -> httpx.Response:
    return localhttp.get(f"{url}{path}", headers={PAYMENT_SIGNATURE_HEADER: payment.header}, timeout=120)


def _signed(chain: Chain, url: str, path: str) -> Payment:
    async def run() -> Payment:
        async with localhttp.AsyncClient(base_url=url) as client:
            return sign_payment(chain, await quote(client, "GET", path))

    return asyncio.run(run())


@pytest.fixture
def live(chain: Chain, tmp_path: Path) -> Iterator[tuple[Shop, str]]:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=3600)
    with served(shop.app) as (url, _):
        yield shop, url


def test_an_operator_key_used_behind_the_sellers_back_does_not_fail_the_next_sale(
    chain: Chain, live: tuple[Shop, str]
) -> None:
    _, url = live
    first = _pay(url, "/report/one", _signed(chain, url, "/report/one"))
    assert first.status_code == 200, first.text
    # The same key sends a transaction elsewhere (a wallet, another replica): the seller's nonce is stale.
    TxSender(chain.w3, dev(OPERATOR)).transact(address(STRANGER), b"", gas=21_000)
    second = _pay(url, "/report/two", _signed(chain, url, "/report/two"))
    assert second.status_code == 200, second.text


@pytest.mark.slow
def test_a_nonce_too_low_from_the_node_is_resynchronised_and_retried_once(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    proxy = RpcProxy(chain.node.url)
    shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url)
    start = int(chain.w3.eth.block_number) + 1
    too_low = {"code": -32003, "message": "nonce too low"}
    try:
        with served(shop.app) as (url, _):
            proxy.fail("eth_sendRawTransaction", too_low, times=1)  # a race the nonce read did not see
            once = _pay(url, "/report/once", _signed(chain, url, "/report/once"))
            assert once.status_code == 200, once.text
            proxy.fail("eth_sendRawTransaction", too_low)  # and again after the resync: a real collision
            payment = _signed(chain, url, "/report/twice")
            began = time.monotonic()
            twice = _pay(url, "/report/twice", payment)
            assert time.monotonic() - began < 10
            assert twice.status_code == 503, twice.text
            assert twice.json()["error"] == Reason.NONCE_CONFLICT
            assert int(twice.headers["retry-after"]) >= 1
            proxy.fail("eth_sendRawTransaction", None)
            again = _pay(url, "/report/twice", payment)  # the same payment, once the key is free
            assert again.status_code == 200, again.text
    finally:
        proxy.close()
    assert len(deposits(chain, start)) == 2


def test_an_operator_without_gas_answers_503_at_once_and_sells_again_when_funded(
    chain: Chain, live: tuple[Shop, str]
) -> None:
    shop, url = live
    start = int(chain.w3.eth.block_number) + 1
    payment = _signed(chain, url, "/report/gas")
    set_gas_money(chain, OPERATOR, 0)  # drained after the start-up check
    began = time.monotonic()
    broke = _pay(url, "/report/gas", payment)
    assert time.monotonic() - began < 10, "a request hung while the operator was drained"
    assert broke.status_code == 503, broke.text
    assert broke.json()["error"] == Reason.OPERATOR_UNFUNDED
    assert int(broke.headers["retry-after"]) >= 1
    assert shop.calls == {}
    set_gas_money(chain, OPERATOR, 10**20)
    paid = _pay(url, "/report/gas", payment)
    assert paid.status_code == 200, paid.text
    assert len(deposits(chain, start)) == 1


def test_a_deposit_not_mined_in_time_answers_503_and_the_same_payment_is_served_once_it_lands(
    chain: Chain, tmp_path: Path
) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", tx_timeout=4, reprice_after=60, poster_interval=3600)
    with served(shop.app) as (url, _):
        _slow_deposit(chain, shop, url)


def _slow_deposit(chain: Chain, shop: Shop, url: str) -> None:
    start = int(chain.w3.eth.block_number) + 1
    payment = _signed(chain, url, "/report/slow")
    operator = shop.config.operator.address
    with no_automine(chain):

        async def run() -> httpx.Response:
            async with localhttp.AsyncClient(base_url=url, timeout=120) as client:
                paid = asyncio.create_task(
                    client.get("/report/slow", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                )
                await asyncio.to_thread(until, "the deposit in the pool", lambda: pending_of(chain, operator))
                # Other requests are answered meanwhile: nothing queues behind the waiting deposit.
                began = time.monotonic()
                assert (await client.get("/report/other")).status_code == 402
                assert (await client.get("/free")).status_code == 200
                assert time.monotonic() - began < 2
                return await paid

        began = time.monotonic()
        pending = asyncio.run(run())
        assert time.monotonic() - began < shop.config.tx_timeout + 10
        assert pending.status_code == 503, pending.text
        assert pending.json()["error"] == Reason.DEPOSIT_PENDING
        assert int(pending.headers["retry-after"]) >= 1
        assert shop.calls == {}
        # Sent again while the deposit is still in the pool: it waits for that one, and sends no second deposit.
        still = _pay(url, "/report/slow", payment)
        assert still.status_code == 503, still.text
        assert still.json()["error"] == Reason.DEPOSIT_PENDING
        assert len(pending_of(chain, operator)) == 1
    # Mining resumes: the deposit that was sent lands, and the same payment is served without a second one.
    until("the deposit mined", lambda: not pending_of(chain, operator))
    served_now = _pay(url, "/report/slow", payment)
    assert served_now.status_code == 200, served_now.text
    assert [e.id for e in deposits(chain, start)] == [payment.escrow_id]
    assert shop.calls == {"report": 1}


def test_a_deposit_left_pending_by_a_process_that_is_gone_is_waited_for_by_the_next_not_sent_again(
    chain: Chain, tmp_path: Path
) -> None:
    """The signed deposit is found in the operator key's transaction log (not on the payment's row) by a new
    process on the same store: it waits for that transaction, and serves the payment once it lands."""
    chain.mine()
    # One public URL for both processes (each server listens on a port of its own): one request, one requestHash.
    settings: dict[str, Any] = {
        "tx_timeout": 3,
        "reprice_after": 60,
        "poster_interval": 3600,
        "public_base_url": "http://shop.example",
    }
    store = tmp_path / "seller.sqlite"
    first = make_shop(chain, store, **settings)
    start = int(chain.w3.eth.block_number) + 1
    operator = first.config.operator.address
    with no_automine(chain):
        with served(first.app) as (url, _):
            payment = _signed(chain, url, "/report/orphan")
            pending = _pay(url, "/report/orphan", payment)
            assert pending.status_code == 503 and pending.json()["error"] == Reason.DEPOSIT_PENDING, pending.text
        first.middleware.store.close()  # that process is gone; its deposit is still in the pool
        sent = pending_of(chain, operator)
        assert len(sent) == 1
        second = make_shop(chain, store, **settings)
        with served(second.app) as (url, _):
            still = _pay(url, "/report/orphan", payment)
            assert still.status_code == 503 and still.json()["error"] == Reason.DEPOSIT_PENDING, still.text
            assert [t["hash"] for t in pending_of(chain, operator)] == [t["hash"] for t in sent]  # no second one
    until("the deposit mined", lambda: not pending_of(chain, operator))
    with served(second.app) as (url, _):
        paid = _pay(url, "/report/orphan", payment)
    assert paid.status_code == 200, paid.text
    settle = decode_payment_response(paid.headers[PAYMENT_RESPONSE_HEADER])
    assert settle.transaction == sent[0]["hash"]  # the orphaned deposit is the one the answer names
    assert [e.id for e in deposits(chain, start)] == [payment.escrow_id]
    assert (first.calls, second.calls) == ({}, {"report": 1})


def test_a_stuck_deposit_is_repriced_and_the_repriced_one_is_mined(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    shop = make_shop(chain, tmp_path / "seller.sqlite", tx_timeout=60, reprice_after=1.0, poster_interval=3600)
    operator = shop.config.operator.address
    start = int(chain.w3.eth.block_number) + 1
    with served(shop.app) as (url, _):
        payment = _signed(chain, url, "/report/stuck")
        with no_automine(chain):

            async def run() -> httpx.Response:
                async with localhttp.AsyncClient(base_url=url, timeout=120) as client:
                    paid = asyncio.create_task(
                        client.get("/report/stuck", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                    )
                    first = await asyncio.to_thread(until, "the deposit", lambda: pending_of(chain, operator))
                    tip = int(first[0]["maxPriorityFeePerGas"], 16)

                    def repriced() -> list[dict[str, Any]]:
                        txs = pending_of(chain, operator)
                        return [t for t in txs if int(t["maxPriorityFeePerGas"], 16) > tip]

                    replacement = (await asyncio.to_thread(until, "a repriced deposit", repriced))[0]
                    assert int(replacement["nonce"], 16) == int(first[0]["nonce"], 16)
                    rpc(chain, "evm_mine", [])
                    response = await paid
                    assert response.status_code == 200, response.text
                    settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
                    mined = chain.w3.eth.get_transaction_receipt(settle.transaction)  # type: ignore[arg-type]
                    assert int(mined["status"]) == 1
                    return response

            asyncio.run(run())
    assert [e.id for e in deposits(chain, start)] == [payment.escrow_id]
    assert chain.escrow.state_of(payment.escrow_id) != State.NONE


def _set_blocked(token: Token, who: str) -> bytes:
    """BlockingToken.setBlocked(who): the shipped token binding has TestUSDC's ABI only."""
    return keccak(text="setBlocked(address)")[:4] + bytes(12) + bytes.fromhex(who[2:])


def _blocking_token_shop(chain: Chain, store: Path, **overrides: Any) -> tuple[Shop, Token]:
    token = chain.deploy_token("BlockingToken")
    shop = make_shop(chain, store, token=token.address, **overrides)
    return shop, token


def test_a_deposit_that_would_revert_gets_402_with_the_revert_and_is_logged_with_the_escrow_id(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain.mine()
    shop, token = _blocking_token_shop(chain, tmp_path / "seller.sqlite")
    chain.deployer.transact(token.address, _set_blocked(token, chain.escrow.address))  # a frozen escrow
    start = int(chain.w3.eth.block_number) + 1
    caplog.set_level(logging.WARNING, logger="escrow_py")
    with served(shop.app) as (url, _):

        async def run() -> tuple[httpx.Response, Payment]:
            async with localhttp.AsyncClient(base_url=url) as client:
                return await buy(client, chain, "GET", "/report/frozen")

        response, payment = asyncio.run(run())
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error.startswith(f"{Reason.SIMULATION_FAILED}: RecipientBlocked(to={chain.escrow.address})"), error
    assert len(error) <= 200
    logged = [r.getMessage() for r in caplog.records if payment.escrow_id.hex() in r.getMessage()]
    assert any("RecipientBlocked" in line for line in logged), caplog.text
    assert deposits(chain, start) == []


def test_a_deposit_that_reverts_when_mined_gets_402_with_the_revert_and_is_logged(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain.mine()
    shop, token = _blocking_token_shop(chain, tmp_path / "seller.sqlite")
    operator = shop.config.operator.address
    caplog.set_level(logging.WARNING, logger="escrow_py")
    with served(shop.app) as (url, _):
        payment = _signed(chain, url, "/report/late-freeze")
        with no_automine(chain):

            async def run() -> httpx.Response:
                async with localhttp.AsyncClient(base_url=url, timeout=120) as client:
                    paid = asyncio.create_task(
                        client.get("/report/late-freeze", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                    )
                    await asyncio.to_thread(until, "the deposit", lambda: pending_of(chain, operator))
                    # The token freezes the escrow in the same block, ahead of the deposit (a higher tip).
                    freezer = chain.sender(STRANGER)
                    signed = freezer.sign(token.address, _set_blocked(token, chain.escrow.address), gas=100_000)
                    freezer.broadcast(freezer.replace(signed, bump=4.0))
                    rpc(chain, "evm_mine", [])
                    return await paid

            response = asyncio.run(run())
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error.startswith(f"{Reason.DEPOSIT_FAILED}: RecipientBlocked("), error
    assert any(
        payment.escrow_id.hex() in r.getMessage() and "RecipientBlocked" in r.getMessage() for r in caplog.records
    ), caplog.text
    assert chain.escrow.state_of(payment.escrow_id) == State.NONE
    assert shop.calls == {}
