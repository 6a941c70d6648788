"""Seller and buyer flows on the in-memory EscrowChain: the ASGI stack in-process, no anvil, no network.

The fake models the escrow's and the token's rules (tests/fakes/chain.py), so these run the
roles' real code paths: the seller verifies, deposits, serves, posts; the buyer signs, pays and
judges the bytes by the hash the chain holds. tests/contracts/test_chain_port_parity.py keeps the
fake honest against the contract on anvil.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec

import httpx
import pytest
from fakes.chain import FakeEscrowChain
from fixtures.fake_chain import FAKE_BALANCE
from helpers import BUYER, BUYER2, OPERATOR, SELLER, address, dev
from seller.payer import quote, sign_payment
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from escrow_py.buyer import EscrowAuth, PaymentState
from escrow_py.buyer._recover import arecover_with
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    decode_payment_required,
    decode_payment_response,
    encode_header,
)
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

PRICE = 10_000
_P = ParamSpec("_P")


def _sync(test: Callable[_P, Coroutine[Any, Any, None]]) -> Callable[_P, None]:
    """Run an async test body on its own event loop, as the other seller and buyer tests do."""

    @functools.wraps(test)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def _seller(chain: FakeEscrowChain, store: Path) -> Starlette:
    async def report(request: Request) -> Response:
        return JSONResponse({"item": request.path_params["item"], "rows": [1, 2, 3]})

    async def fail(request: Request) -> Response:
        return JSONResponse({"error": "the report generator is down"}, status_code=500)

    config = SellerConfig(
        rpc_url="http://127.0.0.1:9",  # never dialled: the middleware is given the fake chain
        escrow=chain.escrow,
        token=chain.token,
        network="eip155:84532",
        pay_to=address(SELLER),
        operator=dev(OPERATOR),
        routes=[
            PricedRoute("GET", "/report/{item}", amount=PRICE, max_timeout_seconds=120),
            PricedRoute("GET", "/fail", amount=PRICE, max_timeout_seconds=120),
        ],
        store=store,
        min_time_left=10,
        startup_checks=False,
    )
    app = Starlette(routes=[Route("/report/{item}", report), Route("/fail", fail)])
    app.add_middleware(EscrowMiddleware, config=config, chain=chain)
    return app


@asynccontextmanager
async def _client(app: Starlette, auth: httpx.Auth | None = None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test", auth=auth) as client:
        yield client


@_sync
async def test_a_paid_request_deposits_serves_and_posts_its_delivery_on_the_fake_chain(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    async with _client(app) as client:
        required = await quote(client, "GET", "/report/a")
        payment = sign_payment(None, required, deadline=fake_chain.next_block_time() + 100)
        paid = await client.get("/report/a", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert paid.status_code == 200, paid.text
        extra = SettlementExtra.from_json(decode_payment_response(paid.headers[PAYMENT_RESPONSE_HEADER]).extra)
        assert extra.escrow_id == payment.escrow_id and extra.delivery_hash == delivery_hash(paid.content)
        # Deposited: the buyer's money is held by the escrow, the authorization spent.
        assert fake_chain.state_of(payment.escrow_id) is State.HELD
        assert fake_chain.balance_of(fake_chain.token, address(BUYER)) == FAKE_BALANCE - PRICE
        assert fake_chain.balance_of(fake_chain.token, fake_chain.escrow) == PRICE
        assert fake_chain.authorization_used(fake_chain.token, address(BUYER), payment.escrow_id)

        # The poster commits the hash of the bytes served, and the seller is paid.
        await EscrowMiddleware.of(app).poster.flush()
        assert fake_chain.state_of(payment.escrow_id) is State.RELEASED
        assert fake_chain.balance_of(fake_chain.token, address(SELLER)) == PRICE
        assert fake_chain.delivered_hash(payment.escrow_id) == delivery_hash(paid.content)

        # A replay is redelivery: the same bytes, no second deposit.
        again = await client.get("/report/a", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
    assert again.status_code == 200 and again.content == paid.content
    assert fake_chain.calls["deposit"] == 1 and fake_chain.calls["deliver_many"] == 1


@_sync
async def test_a_buyer_without_the_funds_is_refused_by_the_tokens_rule_and_nothing_moves(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    async with _client(app) as client:
        required = await quote(client, "GET", "/report/b")
        payment = sign_payment(None, required, buyer=BUYER2, deadline=fake_chain.next_block_time() + 100)
        refused = await client.get("/report/b", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
    assert refused.status_code == 402
    assert decode_payment_required(refused.headers["PAYMENT-REQUIRED"]).error == Reason.INSUFFICIENT_BALANCE
    assert fake_chain.state_of(payment.escrow_id) is State.NONE and "deposit" not in fake_chain.calls


@_sync
async def test_a_handler_that_fails_is_refunded_by_the_operator_at_once(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    async with _client(app) as client:
        required = await quote(client, "GET", "/fail")
        payment = sign_payment(None, required, deadline=fake_chain.next_block_time() + 100)
        failed = await client.get("/fail", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
    assert failed.status_code == 500
    settle = decode_payment_response(failed.headers[PAYMENT_RESPONSE_HEADER])
    assert settle.error_reason == Reason.HANDLER_FAILED_REFUNDED
    # Deposited, then refunded before the deadline by the operator (the contract lets only the seller's side).
    assert fake_chain.state_of(payment.escrow_id) is State.REFUNDED
    assert fake_chain.balance_of(fake_chain.token, address(BUYER)) == FAKE_BALANCE
    assert (fake_chain.calls["deposit"], fake_chain.calls["refund"]) == (1, 1)


@_sync
async def test_a_node_that_cannot_be_reached_answers_503_and_charges_nothing(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    async with _client(app) as client:
        required = await quote(client, "GET", "/report/c")
        payment = sign_payment(None, required, deadline=fake_chain.next_block_time() + 100)
        fake_chain.down = True
        answer = await client.get("/report/c", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
    assert answer.status_code == 503, answer.text
    fake_chain.down = False
    assert fake_chain.state_of(payment.escrow_id) is State.NONE
    assert fake_chain.balance_of(fake_chain.token, address(BUYER)) == FAKE_BALANCE


def _buyer(fake_chain: FakeEscrowChain, journal: Path) -> EscrowAuth:
    return EscrowAuth(dev(BUYER), "http://127.0.0.1:9", journal, chain=fake_chain)


@_sync
async def test_the_buyer_pays_and_judges_the_delivery_against_the_fake_chain(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    auth = _buyer(fake_chain, tmp_path / "buyer.sqlite")
    async with _client(app, auth) as client:
        paid = await client.get("/report/d")
    assert paid.status_code == 200, paid.text
    [entry] = auth.journal.entries()
    assert entry.state is PaymentState.DELIVERED and entry.response_hash == delivery_hash(paid.content)
    assert fake_chain.state_of(entry.escrow_id) is State.HELD  # judged by the seller's hash, not posted yet
    await EscrowMiddleware.of(app).poster.flush()
    assert fake_chain.delivered_hash(entry.escrow_id) == delivery_hash(paid.content)
    auth.journal.close()


@_sync
async def test_the_buyer_judges_a_replay_by_the_hash_on_the_fake_chain_not_by_the_sellers_header(
    fake_chain: FakeEscrowChain, tmp_path: Path
) -> None:
    app = _seller(fake_chain, tmp_path / "seller.sqlite")
    auth = _buyer(fake_chain, tmp_path / "buyer.sqlite")
    forged = b'{"item": "e", "rows": []}'
    mode = "lose the answer"

    async def network(request: httpx.Request) -> httpx.Response:
        async with _client(app) as honest:
            answer = await honest.send(request)
        if PAYMENT_SIGNATURE_HEADER not in request.headers:
            return answer
        if mode == "lose the answer":  # served and paid, but the connection drops before the bytes arrive
            raise httpx.ReadError("connection lost", request=request)
        # On replay the seller lies: other bytes, and a PAYMENT-RESPONSE naming their hash as the committed one.
        settle = json.loads(base64.b64decode(answer.headers[PAYMENT_RESPONSE_HEADER]))
        settle["extra"]["deliveryHash"] = "0x" + delivery_hash(forged).hex()
        headers = {**answer.headers, PAYMENT_RESPONSE_HEADER: encode_header(settle), "content-length": str(len(forged))}
        return httpx.Response(answer.status_code, headers=headers, content=forged)

    async with httpx.AsyncClient(transport=httpx.MockTransport(network), base_url="http://shop.test", auth=auth) as c:
        with pytest.raises(httpx.ReadError):
            await c.get("/report/e")
    [entry] = auth.journal.entries()
    await EscrowMiddleware.of(app).poster.flush()
    assert fake_chain.state_of(entry.escrow_id) is State.RELEASED
    committed = fake_chain.delivered_hash(entry.escrow_id)

    mode = "lie"
    async with httpx.AsyncClient(transport=httpx.MockTransport(network), base_url="http://shop.test") as liar:
        report = await arecover_with(auth.core, liar, refund_expired=False)
    [item] = report.items
    assert item.journal_state is PaymentState.MISMATCH, item
    got = auth.journal.get(entry.escrow_id)
    assert got is not None and got.committed_hash == committed and got.response_hash == delivery_hash(forged)
    auth.journal.close()
