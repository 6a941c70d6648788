"""The seller middleware on a real anvil: 402, pay, deposit, serve, post the delivery, refund, replay, restart."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address
from starlette.types import Message
from x402.schemas import PaymentRequired

from escrow_py.chain.escrow import Delivered, Refunded
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowRequirements,
    SettlementExtra,
    decode_payment_required,
    decode_payment_response,
)
from escrow_py.seller import PricedRoute, post_pending

from .payer import buy, quote, sign_payment
from .shop import PRICE, Shop, deposits, make_config, make_shop, set_gas_money


def _settlement(response_headers: dict[str, str] | object) -> tuple[object, SettlementExtra]:
    settle = decode_payment_response(response_headers[PAYMENT_RESPONSE_HEADER])  # type: ignore[index]
    return settle, SettlementExtra.from_json(settle.extra)


def _served_and_held(chain: Chain, shop: Shop, path: str) -> bytes:
    """Buy `path` once; the delivery is queued, not posted yet. Returns the escrow id."""

    async def serve() -> bytes:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", path)
        assert response.status_code == 200
        return payment.escrow_id

    return asyncio.run(serve())


def test_unpriced_route_passes_through_and_priced_route_answers_402(shop: Shop) -> None:
    async def run() -> None:
        async with shop.client() as client:
            free = await client.get("/free")
            assert free.status_code == 200
            assert free.json() == {"free": True}
            assert PAYMENT_REQUIRED_HEADER not in free.headers
            refused = await client.get("/report/a?x=1")
        assert refused.status_code == 402
        assert refused.headers["cache-control"] == "no-store"
        required = decode_payment_required(refused.headers[PAYMENT_REQUIRED_HEADER])
        assert PaymentRequired.model_validate(refused.json()) == required
        assert required.resource is not None
        assert required.resource.url == "http://testserver/report/a?x=1"
        req = EscrowRequirements.from_model(required.accepts[0])
        assert req.amount == PRICE
        assert req.pay_to == address(SELLER)
        assert req.extra.escrow == shop.config.escrow
        assert req.extra.operator == shop.config.operator.address
        assert req.extra.request_hash == request_hash("GET", "http://testserver/report/a?x=1", b"")
        assert shop.calls == {}

    asyncio.run(run())


def test_happy_path_deposits_serves_and_posts_the_delivery_hash(chain: Chain, shop: Shop) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))
    seller_before = chain.token.balance_of(address(SELLER))
    start = int(chain.w3.eth.block_number)

    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/report/abc")
        assert response.status_code == 200, response.text
        assert response.json() == {"item": "abc", "call": 1}
        settle, extra = _settlement(response.headers)
        assert settle.success is True  # type: ignore[attr-defined]
        assert settle.payer == address(BUYER)  # type: ignore[attr-defined]
        assert extra.escrow_id == payment.escrow_id
        assert extra.deadline == payment.terms.deadline
        assert extra.delivery_hash == delivery_hash(response.content)
        receipt = chain.w3.eth.get_transaction_receipt(settle.transaction)  # type: ignore[attr-defined]
        assert receipt["status"] == 1
        # Held in escrow until the delivery is posted.
        assert chain.escrow.state_of(payment.escrow_id) == State.HELD
        assert chain.token.balance_of(chain.escrow.address) == PRICE
        assert chain.token.balance_of(address(BUYER)) == buyer_before - PRICE
        report = await shop.middleware.poster.flush()
        assert report.posted == [payment.escrow_id]
        assert chain.escrow.state_of(payment.escrow_id) == State.RELEASED
        assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE
        assert chain.token.balance_of(chain.escrow.address) == 0
        delivered = [e for e in chain.escrow.events(start, int(chain.w3.eth.block_number)) if isinstance(e, Delivered)]
        assert [(e.id, e.delivery_hash) for e in delivered] == [(payment.escrow_id, delivery_hash(response.content))]
        # Nothing left to post.
        assert (await shop.middleware.poster.flush()).posted == []

    asyncio.run(run())


@pytest.mark.parametrize(("path", "status"), [("/fail", 503), ("/boom", 500)])
def test_handler_failure_is_refunded_at_once(chain: Chain, shop: Shop, path: str, status: int) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))
    start = int(chain.w3.eth.block_number)

    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", path)
            assert response.status_code == status
            settle, extra = _settlement(response.headers)
            assert settle.error_reason == Reason.HANDLER_FAILED_REFUNDED  # type: ignore[attr-defined]
            assert extra.state is State.REFUNDED
            assert extra.refund_transaction is not None
            assert chain.escrow.state_of(payment.escrow_id) == State.REFUNDED
            assert chain.token.balance_of(address(BUYER)) == buyer_before
            refunded = [
                e for e in chain.escrow.events(start, int(chain.w3.eth.block_number)) if isinstance(e, Refunded)
            ]
            assert [e.id for e in refunded] == [payment.escrow_id]
            # A replay gets the same failure, without running the handler or paying again.
            again = await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
            assert (again.status_code, again.content) == (response.status_code, response.content)
            assert len(deposits(chain, start)) == 1
        assert shop.calls == {path.strip("/"): 1}
        assert (await shop.middleware.poster.flush()).posted == []

    asyncio.run(run())


def test_replay_returns_the_stored_response_byte_identical_with_one_deposit(chain: Chain, shop: Shop) -> None:
    start = int(chain.w3.eth.block_number)

    async def run() -> None:
        async with shop.client() as client:
            first, payment = await buy(client, chain, "POST", "/echo", b"hello")
            assert first.status_code == 200
            assert first.content == b"echo:hello"
            await shop.middleware.poster.flush()
            second = await client.post("/echo", content=b"hello", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert second.status_code == 200
        assert second.content == first.content
        assert second.headers["content-type"] == first.headers["content-type"]
        _, extra = _settlement(second.headers)
        assert extra.delivery_hash == delivery_hash(first.content)
        assert extra.state is State.RELEASED
        assert extra.delivery_transaction is not None
        assert [e.id for e in deposits(chain, start)] == [payment.escrow_id]
        assert shop.calls == {"echo": 1}

    asyncio.run(run())


def test_restart_a_new_poster_on_the_same_store_posts_the_pending_delivery(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    async def serve() -> tuple[bytes, bytes, str]:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/report/restart")
        assert response.status_code == 200
        return payment.escrow_id, response.content, payment.header

    escrow_id, body, header = asyncio.run(serve())
    shop.middleware.store.close()  # the first process is gone, its delivery never posted
    assert chain.escrow.state_of(escrow_id) == State.HELD

    restarted = make_shop(chain, tmp_path / "seller.sqlite")
    report = asyncio.run(restarted.middleware.poster.flush())
    assert report.posted == [escrow_id]
    assert chain.escrow.state_of(escrow_id) == State.RELEASED
    delivered = [e for e in chain.escrow.events(0, int(chain.w3.eth.block_number)) if isinstance(e, Delivered)]
    assert [e.delivery_hash for e in delivered if e.id == escrow_id] == [delivery_hash(body)]

    async def replay() -> None:
        async with restarted.client() as client:
            again = await client.get("/report/restart", headers={PAYMENT_SIGNATURE_HEADER: header})
        assert (again.status_code, again.content) == (200, body)

    asyncio.run(replay())
    assert restarted.calls == {}  # served from the store, not by the handler


def test_a_seller_that_died_mid_handler_serves_the_held_payment_after_restart(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    start = int(chain.w3.eth.block_number) + 1
    shop.crash_next = True

    async def pay_and_die() -> str:
        async with shop.client() as client:
            payment = sign_payment(chain, await quote(client, "GET", "/crashy"))
            died = False
            try:
                await client.get("/crashy", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
            except BaseException as exc:  # anyio may wrap it in a group
                died = "ProcessDied" in repr(exc)
            assert died, "the handler's crash must reach the top, as a dying process would"
            return payment.header

    header = asyncio.run(pay_and_die())
    shop.middleware.store.close()
    [deposited] = deposits(chain, start)
    assert chain.escrow.state_of(deposited.id) == State.HELD

    restarted = make_shop(chain, tmp_path / "seller.sqlite")

    async def replay() -> None:
        async with restarted.client() as client:
            response = await client.get("/crashy", headers={PAYMENT_SIGNATURE_HEADER: header})
        assert response.status_code == 200
        assert response.json() == {"served": "after the crash"}
        _, extra = _settlement(response.headers)
        assert extra.escrow_id == deposited.id
        assert (await restarted.middleware.poster.flush()).posted == [deposited.id]

    asyncio.run(replay())
    assert len(deposits(chain, start)) == 1
    assert chain.escrow.state_of(deposited.id) == State.RELEASED


def test_the_poster_retries_a_delivery_until_it_is_confirmed(chain: Chain, shop: Shop) -> None:
    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/report/retry")
        assert response.status_code == 200
        set_gas_money(chain, OPERATOR, 0)
        failed = await shop.middleware.poster.flush()
        assert failed.posted == []
        assert failed.errors
        assert chain.escrow.state_of(payment.escrow_id) == State.HELD
        set_gas_money(chain, OPERATOR, 10**20)
        retried = await shop.middleware.poster.flush()
        assert retried.posted == [payment.escrow_id]
        assert chain.escrow.state_of(payment.escrow_id) == State.RELEASED

    asyncio.run(run())


def test_a_refund_that_fails_is_retried_by_the_poster(chain: Chain, shop: Shop) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))

    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/fail-broke")
        assert response.status_code == 502
        settle, extra = _settlement(response.headers)
        assert settle.error_reason == Reason.HANDLER_FAILED_REFUNDED  # type: ignore[attr-defined]
        assert extra.state is State.HELD  # the refund did not go through yet
        assert extra.refund_transaction is None
        assert chain.escrow.state_of(payment.escrow_id) == State.HELD
        set_gas_money(chain, OPERATOR, 10**20)
        report = await shop.middleware.poster.flush()
        assert report.refunded == [payment.escrow_id]
        assert report.posted == []  # a failed response is never delivered
        assert chain.escrow.state_of(payment.escrow_id) == State.REFUNDED
        assert chain.token.balance_of(address(BUYER)) == buyer_before

    asyncio.run(run())


def test_a_flush_from_another_event_loop_waits_for_the_running_pass_and_never_overlaps(
    chain: Chain, shop: Shop
) -> None:
    # The lifespan's poster runs on uvicorn's loop; an operator (or a test) may flush
    # from its own thread and loop at the same moment. It must wait its turn, not hang.
    escrow_id = _served_and_held(chain, shop, "/report/two-loops")
    poster = shop.middleware.poster
    entered, second_entered, release = threading.Event(), threading.Event(), threading.Event()
    inside, most_inside, passes = [0], [0], set[int]()
    pending = poster.store.pending_deliveries

    def held_pass(limit: int) -> list[Any]:
        passes.add(threading.get_ident())
        if len(passes) > 1:
            second_entered.set()
        inside[0] += 1
        most_inside[0] = max(most_inside[0], inside[0])
        entered.set()
        release.wait(10)
        inside[0] -= 1
        return pending(limit)

    poster.store.pending_deliveries = held_pass  # type: ignore[method-assign,assignment]
    reports: dict[str, Any] = {}

    def flush_on_own_loop(name: str) -> None:
        reports[name] = asyncio.run(poster.flush())

    first = threading.Thread(target=flush_on_own_loop, args=("first",))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=flush_on_own_loop, args=("second",))
    second.start()
    # Without serialisation the second pass would be inside within this half second.
    assert not second_entered.wait(0.5), "a second pass ran while the first was under way"
    release.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive() and not second.is_alive(), "a flush from a second event loop hung"
    assert most_inside[0] == 1
    assert reports["first"].posted + reports["second"].posted == [escrow_id]
    assert chain.escrow.state_of(escrow_id) == State.RELEASED


def test_post_pending_function_posts_from_the_store(chain: Chain, shop: Shop) -> None:
    escrow_id = _served_and_held(chain, shop, "/report/cron")
    shop.middleware.store.close()
    report = post_pending(shop.config)
    assert report.posted == [escrow_id]
    assert chain.escrow.state_of(escrow_id) == State.RELEASED


def test_a_delivery_past_its_deadline_is_not_posted(chain: Chain, shop: Shop) -> None:
    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/report/late")
            assert response.status_code == 200
            chain.mine(payment.terms.deadline + 1)
            report = await shop.middleware.poster.flush()
            assert report.expired == [payment.escrow_id]
            assert report.posted == []
            assert chain.escrow.state_of(payment.escrow_id) == State.HELD  # refundable by anyone now
            # Expired entries are closed: a second pass does not look at them again.
            assert (await shop.middleware.poster.flush()).expired == []

    asyncio.run(run())


def test_deposited_but_never_answered_is_served_now_or_refused_as_refundable(chain: Chain, shop: Shop) -> None:
    """A seller that crashed mid-handler: the escrow is Held on chain and the store has no response."""
    start = int(chain.w3.eth.block_number)

    async def run() -> None:
        async with shop.client() as client:
            in_time = sign_payment(chain, await quote(client, "GET", "/report/crash"))
            late = sign_payment(chain, await quote(client, "GET", "/report/crash"))
            for payment in (in_time, late):
                chain.escrow.deposit(chain.sender(SELLER), payment.terms, payment.authorization, payment.signature)
            served = await client.get("/report/crash", headers={PAYMENT_SIGNATURE_HEADER: in_time.header})
            assert served.status_code == 200
            assert served.json()["item"] == "crash"
            _, extra = _settlement(served.headers)
            assert extra.delivery_hash == delivery_hash(served.content)
            assert (await shop.middleware.poster.flush()).posted == [in_time.escrow_id]

            chain.mine(late.terms.deadline + 1)
            refused = await client.get("/report/crash", headers={PAYMENT_SIGNATURE_HEADER: late.header})
            assert refused.status_code == 402
            assert json.loads(refused.content)["error"] == Reason.ESCROW_REFUNDABLE
        assert len(deposits(chain, start)) == 2  # the seller deposited nothing itself
        assert shop.calls == {"report": 1}

    asyncio.run(run())


def test_concurrent_payments_each_deposit_exactly_once(chain: Chain, shop: Shop) -> None:
    start = int(chain.w3.eth.block_number)
    buyer_before = chain.token.balance_of(address(BUYER))

    async def run() -> None:
        async with shop.client() as client:
            results = await asyncio.gather(*(buy(client, chain, "GET", f"/report/{i}") for i in range(8)))
            assert all(r.status_code == 200 for r, _ in results), [r.text for r, _ in results]
            # The same payment sent several times at the same moment deposits once.
            payment = sign_payment(chain, await quote(client, "GET", "/report/same"))
            same = await asyncio.gather(
                *(client.get("/report/same", headers={PAYMENT_SIGNATURE_HEADER: payment.header}) for _ in range(5))
            )
        assert {r.status_code for r in same} == {200}
        assert len({r.content for r in same}) == 1
        ids = sorted(e.id for e in deposits(chain, start))
        assert ids == sorted([p.escrow_id for _, p in results] + [payment.escrow_id])
        assert chain.token.balance_of(address(BUYER)) == buyer_before - 9 * PRICE
        assert shop.calls == {"report": 9}
        report = await shop.middleware.poster.flush()
        assert sorted(report.posted) == ids

    asyncio.run(run())


def test_lifespan_starts_and_stops_the_poster(chain: Chain, shop: Shop) -> None:
    async def run() -> None:
        async with shop.client() as client:
            response, payment = await buy(client, chain, "GET", "/report/lifespan")
        assert response.status_code == 200
        middleware = shop.middleware
        messages = asyncio.Queue[dict[str, str]]()
        sent: list[str] = []

        async def receive() -> dict[str, str]:
            return await messages.get()

        async def send(message: Message) -> None:
            sent.append(message["type"])

        await messages.put({"type": "lifespan.startup"})
        task = asyncio.create_task(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        for _ in range(200):
            if chain.escrow.state_of(payment.escrow_id) == State.RELEASED:
                break
            await asyncio.sleep(0.05)
        assert middleware.poster.running
        assert chain.escrow.state_of(payment.escrow_id) == State.RELEASED
        await messages.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert not middleware.poster.running

    asyncio.run(run())


def test_an_unreachable_node_answers_503_and_deposits_nothing(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    offline = make_shop(chain, tmp_path / "offline.sqlite", rpc_url="http://127.0.0.1:9")

    async def run() -> None:
        async with offline.client() as client:
            response, _ = await buy(client, chain, "GET", "/report/offline")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"] == Reason.CHAIN_UNAVAILABLE
        assert "127.0.0.1:9" not in response.text, "the node's URL (it can hold an API key) must not leak"

    asyncio.run(run())
    assert deposits(chain, start) == []
    assert offline.calls == {}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"escrow": "0x1234"}, "escrow"),
        ({"network": "base-sepolia"}, "network"),
        ({"rpc_url": "ws://x"}, "rpc_url"),
        ({"operator": "0xabc"}, "operator"),
        ({"routes": []}, "routes"),
        ({"confirmations": 0}, "confirmations"),
        ({"poster_interval": 0}, "poster_interval"),
        ({"rpc_timeout": 0}, "rpc_timeout"),
        ({"tx_timeout": -1}, "tx_timeout"),
        ({"reprice_after": "soon"}, "reprice_after"),
        ({"confirmation_depth": 0}, "confirmation_depth"),
        ({"startup_checks": "yes"}, "startup_checks"),
        ({"store": "mysql://db/shop"}, "store"),
        ({"min_time_left": 500}, "min_time_left"),
    ],
)
def test_bad_settings_raise_config_error(
    chain: Chain, tmp_path: Path, overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        settings = dict(overrides)
        make_config(chain, settings.pop("store", tmp_path / "s.sqlite"), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "FETCH"}, "method"),
        ({"path": "report"}, "path"),
        ({"amount": 0}, "amount"),
        ({"max_timeout_seconds": 0}, "max_timeout_seconds"),
    ],
)
def test_bad_route_raises_config_error(kwargs: dict[str, object], fragment: str) -> None:
    settings: dict[str, object] = {"method": "GET", "path": "/x", "amount": 1, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        PricedRoute(**settings)  # type: ignore[arg-type]
