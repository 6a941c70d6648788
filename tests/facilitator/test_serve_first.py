"""Serve-first through the facilitator: a keyless seller answers before any money moves, and the
facilitator's /settle queues the settlement (settleMany) with the delivery hash the payload carries.

The facilitator is real (uvicorn, its own SQLite, the session's anvil); the seller is FastAPI behind
FacilitatorMiddleware on uvicorn with one hold route and serve-first routes; the buyer is the test payer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import localhttp
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address
from seller.payer import quote, sign_payment
from seller.shop import served

from escrow_devtools.anvil import free_port
from escrow_py.chain.escrow import Deposited
from escrow_py.facilitator import Facilitator, KeyStore, create_app
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    SettlementMode,
    SettlementStatus,
    decode_payment_response,
)
from escrow_py.seller import FacilitatorMiddleware, FacilitatorSellerConfig, PricedRoute
from escrow_py.seller._store import SellerStore, SettleStatus

from .kit import Fac, fac_config, idem, requirements, settled_on_chain, signed
from .process import FacilitatorProcess
from .test_api import wait_for

PRICE = 10_000
SF = SettlementMode.SERVE_FIRST


@dataclass
class Seller:
    url: str
    store: Path
    calls: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def seller(chain: Chain, fac: Fac, tmp_path: Path) -> Iterator[Seller]:
    app = FastAPI()
    calls: dict[str, int] = {}

    @app.get("/fast/{item}")
    async def fast(item: str) -> dict[str, object]:
        calls["fast"] = calls.get("fast", 0) + 1
        return {"item": item, "call": calls["fast"]}

    @app.get("/fast-fail")
    async def fast_fail() -> JSONResponse:
        calls["fast-fail"] = calls.get("fast-fail", 0) + 1
        return JSONResponse({"error": "upstream down"}, status_code=502)

    @app.get("/held/{item}")
    async def held(item: str) -> dict[str, str]:
        return {"held": item}

    routes = [
        PricedRoute("GET", "/fast/{item}", amount=PRICE, settlement=SF, fallback_to_hold=False),
        PricedRoute("GET", "/fast-fail", amount=PRICE, settlement=SF),
        PricedRoute("GET", "/held/{item}", amount=PRICE),  # hold, beside serve-first, on one seller
    ]
    store = tmp_path / "seller.sqlite"
    config = FacilitatorSellerConfig(
        facilitator_url=fac.url, api_key=fac.key, network="eip155:84532", token=chain.token.address,
        pay_to=address(SELLER), routes=routes, store=store, outbox_interval=0.2,
        serve_first_max_price=PRICE, serve_first_max_per_buyer=5 * PRICE, serve_first_max_total=10 * PRICE,
    )  # fmt: skip
    app.add_middleware(FacilitatorMiddleware, config=config)
    with served(app) as (url, _server):
        yield Seller(url, store, calls)


def _extra(response: httpx.Response) -> tuple[object, SettlementExtra]:
    settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
    return settle, SettlementExtra.from_json(settle.extra)


def test_a_keyless_seller_serves_first_and_the_facilitator_settles_in_a_batch(chain: Chain, seller: Seller) -> None:
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    seller_before = chain.token.balance_of(address(SELLER))

    async def run() -> list[tuple[bytes, httpx.Response, str]]:
        async with localhttp.AsyncClient(base_url=seller.url, timeout=60) as client:
            paid = []
            for item in range(3):
                required = await quote(client, "GET", f"/fast/{item}")
                payment = sign_payment(chain, required)
                response = await client.get(f"/fast/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                paid.append((payment.escrow_id, response, payment.header))
            return paid

    paid = asyncio.run(run())
    for escrow_id, response, _ in paid:
        assert response.status_code == 200, response.text
        settle, extra = _extra(response)
        # Answered before any money moved: the settlement is queued, there is no transaction yet.
        assert extra.settlement == SettlementStatus.PENDING and extra.escrow_id == escrow_id
        assert settle.transaction == ""  # type: ignore[attr-defined]
        assert extra.delivery_hash == delivery_hash(response.content)
    assert seller.calls["fast"] == 3

    wait_for(lambda: settled_on_chain(chain, start).keys() >= {i for i, _, _ in paid}, timeout=60)
    hashes = settled_on_chain(chain, start)
    assert all(hashes[i] == delivery_hash(r.content) for i, r, _ in paid)  # the bytes each buyer got
    deposits = chain.escrow.events(start, int(chain.w3.eth.block_number))
    assert not any(isinstance(e, Deposited) for e in deposits)  # nothing was ever held
    assert all(chain.escrow.state_of(i) == State.NONE for i, _, _ in paid)  # a settled id takes no slot
    assert chain.token.balance_of(address(SELLER)) == seller_before + 3 * PRICE
    # The seller's outbox follows the settlement at the facilitator; a replay then says settled, same bytes.
    store = SellerStore(seller.store)
    try:
        wait_for(
            lambda: all((r := store.settlement(i)) and r.status == SettleStatus.SETTLED for i, _, _ in paid), timeout=30
        )
    finally:
        store.close()
    escrow_id, first, header = paid[0]
    replay = localhttp.get(f"{seller.url}/fast/0", headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=30)
    settle, extra = _extra(replay)
    assert replay.content == first.content and extra.settlement == SettlementStatus.SETTLED
    assert settle.transaction.startswith("0x")  # type: ignore[attr-defined]
    assert seller.calls["fast"] == 3  # replays never ran the handler again


def test_a_failed_serve_first_handler_charges_nothing_and_queues_nothing(
    chain: Chain, fac: Fac, seller: Seller
) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))

    async def run() -> httpx.Response:
        async with localhttp.AsyncClient(base_url=seller.url, timeout=60) as client:
            payment = sign_payment(chain, await quote(client, "GET", "/fast-fail"))
            return await client.get("/fast-fail", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    response = asyncio.run(run())
    assert response.status_code == 502
    settle, _ = _extra(response)
    assert settle.error_reason == Reason.HANDLER_FAILED_NOT_CHARGED  # type: ignore[attr-defined]
    assert fac.facilitator.store.settlements_due() == []  # the facilitator never heard of a settlement
    chain.mine()
    assert chain.token.balance_of(address(BUYER)) == buyer_before


def test_hold_and_serve_first_routes_side_by_side(chain: Chain, seller: Seller) -> None:
    async def run() -> httpx.Response:
        async with localhttp.AsyncClient(base_url=seller.url, timeout=60) as client:
            payment = sign_payment(chain, await quote(client, "GET", "/held/1"))
            return await client.get("/held/1", headers={PAYMENT_SIGNATURE_HEADER: payment.header})

    response = asyncio.run(run())
    _, extra = _extra(response)
    assert response.status_code == 200 and extra.settlement == SettlementStatus.HELD
    assert chain.escrow.state_of(extra.escrow_id) in (State.HELD, State.RELEASED)  # deposited before serving


def _serve_first_body(chain: Chain, delivery: str | None, *, item: int = 1) -> tuple[bytes, dict[str, object]]:
    offer = requirements(chain, url=f"http://shop.test/fast/{item}", settlement=SF)
    payment, body = signed(chain, offer)
    if delivery is not None:
        body["paymentPayload"]["payload"]["deliveryHash"] = delivery
    return payment.escrow_id, body


def test_settle_serve_first_needs_the_delivery_hash_and_never_takes_a_second_one(chain: Chain, fac: Fac) -> None:
    hashed = "0x" + "ab" * 32
    escrow_id, body = _serve_first_body(chain, None)
    with fac.client(fac.key) as client:
        missing = client.post("/settle", json=body).json()
        assert missing["success"] is False and missing["errorReason"] == Reason.INVALID_PAYLOAD
        assert fac.facilitator.store.payment(escrow_id) is None  # refused: nothing recorded
        body["paymentPayload"]["payload"]["deliveryHash"] = hashed  # type: ignore[index]
        first = client.post("/settle", json=body).json()
        assert first["success"] is True and first["extra"]["settlement"] == "pending"
        assert first["extra"]["deliveryHash"] == hashed and first["transaction"] == ""
        again = client.post("/settle", json=body).json()  # the same payment again: the same settlement
        assert again["extra"]["escrowId"] == first["extra"]["escrowId"]
        body["paymentPayload"]["payload"]["deliveryHash"] = "0x" + "cd" * 32  # type: ignore[index]
        other = client.post("/settle", json=body)
        assert other.status_code == 409 and other.json()["error"] == "delivery_conflict"
        with fac.client(fac.other_key) as stranger:  # another seller's key cannot settle this payTo
            assert stranger.post("/settle", json=body).status_code == 403
        entry = {"escrowId": "0x" + escrow_id.hex(), "deliveryHash": hashed}
        deliver = client.post("/deliver", headers={"Idempotency-Key": idem()}, json={"deliveries": [entry]})
        assert deliver.status_code == 409  # serve-first has no deposit to deliver
    record = fac.facilitator.store.settlement(escrow_id)
    assert record is not None and record.delivery_hash == bytes.fromhex(hashed[2:])
    wait_for(lambda: (r := fac.facilitator.store.settlement(escrow_id)) is not None
             and r.status == SettleStatus.SETTLED, timeout=60)  # fmt: skip
    # Its gas goes in the ledger once the poster's pass that sent it ends.
    wait_for(lambda: any(r["kind"] == "settle" for r in fac.facilitator.ledger.figures().recent), timeout=30)


def test_verify_refuses_another_sellers_pay_to_and_simulates_the_pull_for_serve_first(chain: Chain, fac: Fac) -> None:
    """/verify answers 403 for a payTo the key does not own (not a 503), and judges a serve-first payment by a
    simulation of the settlement's pull: a buyer without the funds is invalid before anything is served."""
    _, body = _serve_first_body(chain, None)
    with fac.client(fac.other_key) as stranger:
        refused = stranger.post("/verify", json=body)
    assert refused.status_code == 403 and refused.json()["error"] == "not_your_pay_to"
    with fac.client(fac.key) as client:
        assert client.post("/verify", json=body).json()["isValid"] is True
        offer = requirements(chain, url="http://shop.test/fast/2", settlement=SF, amount=10**30)
        _, broke = signed(chain, offer)
        verdict = client.post("/verify", json=broke).json()
    assert verdict["isValid"] is False and verdict["invalidReason"] == Reason.INSUFFICIENT_BALANCE


def test_a_serve_first_settlement_queued_while_the_facilitator_is_down_leaves_when_it_returns(
    chain: Chain, tmp_path: Path
) -> None:
    """The facilitator (a real process) dies after /verify, while the handler runs: the buyer still gets its
    bytes (answered `pending`), the settlement waits in the seller's store, and is settled once it is back."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    keys.close()
    process = FacilitatorProcess(chain, db, free_port())
    app = FastAPI()

    @app.get("/kills-facilitator")
    async def kills() -> dict[str, str]:
        await asyncio.to_thread(process.kill)  # after /verify, before the settlement is handed over
        return {"served": "while the facilitator was down"}

    route = PricedRoute("GET", "/kills-facilitator", amount=PRICE, settlement=SF, fallback_to_hold=False)
    config = FacilitatorSellerConfig(
        facilitator_url=process.url, api_key=key, network="eip155:84532", token=chain.token.address,
        pay_to=address(SELLER), routes=[route], store=tmp_path / "seller.sqlite", outbox_interval=0.2,
        serve_first_max_price=PRICE, serve_first_max_per_buyer=PRICE, serve_first_max_total=PRICE,
    )  # fmt: skip
    app.add_middleware(FacilitatorMiddleware, config=config)
    try:
        with served(app) as (url, _server):

            async def buy() -> tuple[bytes, httpx.Response]:
                async with localhttp.AsyncClient(base_url=url, timeout=60) as client:
                    payment = sign_payment(chain, await quote(client, "GET", "/kills-facilitator"))
                    response = await client.get(
                        "/kills-facilitator", headers={PAYMENT_SIGNATURE_HEADER: payment.header}
                    )
                    return payment.escrow_id, response

            escrow_id, response = asyncio.run(buy())
            assert response.status_code == 200, response.text
            assert _extra(response)[1].settlement == SettlementStatus.PENDING
            time.sleep(1.5)  # several outbox passes fail meanwhile
            assert escrow_id not in settled_on_chain(chain, start)
            process.start()
            wait_for(lambda: settled_on_chain(chain, start).get(escrow_id) == delivery_hash(response.content),
                     timeout=60)  # fmt: skip
    finally:
        process.stop()


def test_settlements_handed_over_one_at_a_time_leave_in_one_settle_many(chain: Chain, tmp_path: Path) -> None:
    """A keyless seller hands each serve-first settlement over in its own /settle; with `settle_batch_wait` the
    facilitator's poster holds them until the oldest has waited that long, so they share one settleMany
    although several poster passes run between them."""
    chain.mine()
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    facilitator = Facilitator(fac_config(chain, db, poster_interval=0.1, settle_batch_wait=3.0))
    ids = []
    try:
        with (
            served(create_app(facilitator, keys)) as (url, _server),
            localhttp.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client,
        ):
            for item in range(3):
                escrow_id, body = _serve_first_body(chain, "0x" + f"{item + 1:02x}" * 32, item=item)
                answer = client.post("/settle", json=body).json()
                assert answer["success"] is True and answer["extra"]["settlement"] == "pending", answer
                ids.append(escrow_id)
                time.sleep(0.4)  # several poster passes between two hand-overs
            store = facilitator.store
            wait_for(lambda: all((r := store.settlement(i)) is not None and r.status == SettleStatus.SETTLED
                                 for i in ids), timeout=60)  # fmt: skip
            txs = {record.tx_hash for i in ids if (record := store.settlement(i)) is not None}
    finally:
        facilitator.close()
        keys.close()
    assert len(txs) == 1 and None not in txs
