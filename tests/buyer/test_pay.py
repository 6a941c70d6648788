"""Paying through the real seller middleware: terms, journal durability, refusals, delivery checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, STRANGER, address, dev
from starlette.types import Message, Receive, Scope, Send

from escrow_py.buyer import (
    AsyncEscrowClient,
    DeliveryMismatch,
    EscrowAuth,
    HandlerFailedRefunded,
    Journal,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentRejected,
    PaymentState,
    PolicyDenied,
    RequestHashMismatch,
)
from escrow_py.chain.clock import next_block_time
from escrow_py.protocol.errors import EscrowError
from escrow_py.protocol.terms import State, delivery_hash, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowPayload,
    decode_payment_required,
    decode_payment_response,
    decode_payment_signature,
    encode_payment_required,
)

from .shop import BASE_URL, PRICE, Faulty, LostPayment, Shop


def client(chain: Chain, journal: Path, transport: httpx.AsyncBaseTransport, **kw: object) -> AsyncEscrowClient:
    return AsyncEscrowClient(dev(BUYER), chain.node.url, journal, transport=transport, base_url=BASE_URL, **kw)


def test_happy_path_pays_once_and_verifies_the_hash(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))

    async def run() -> httpx.Response:
        async with client(chain, journal, shop.transport()) as buyer:
            return await buyer.get("/report/42")

    response = asyncio.run(run())
    assert response.status_code == 200
    assert response.json() == {"item": "42", "call": 1}
    extra = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER]).extra or {}
    assert extra["deliveryHash"] == "0x" + keccak(response.content).hex()
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED
    assert entry.response_hash == keccak(response.content)
    assert entry.url == f"{BASE_URL}/report/42"
    assert chain.escrow.state_of(entry.escrow_id) is State.HELD  # the seller's poster releases it later
    assert chain.token.balance_of(address(BUYER)) == before - PRICE


def test_journal_row_is_committed_before_the_payment_leaves(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    transport = Faulty(shop.transport(), drop_before=True)

    async def run() -> None:
        async with client(chain, journal, transport) as buyer:
            await buyer.get("/report/7")

    with pytest.raises(PaymentNotDelivered) as lost:
        asyncio.run(run())
    assert isinstance(lost.value.__cause__, LostPayment)  # the dropped connection, typed as money in flight
    assert transport.paid_sent == 0
    (entry,) = Journal(journal).entries()  # a fresh connection: what a new process would read
    assert entry.state is PaymentState.SIGNED
    assert (entry.method, entry.url, entry.body) == ("GET", f"{BASE_URL}/report/7", b"")
    assert decode_payment_signature(entry.payment_header).accepted.scheme == "delivery-escrow"


def test_signed_terms_are_the_offer_and_deposit_on_chain(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    now = chain.now()

    async def run() -> None:
        async with client(chain, journal, Faulty(shop.transport(), drop_before=True)) as buyer:
            await buyer.post("/echo", content=b"payload bytes")

    with pytest.raises(PaymentNotDelivered) as lost:
        asyncio.run(run())
    assert isinstance(lost.value.__cause__, LostPayment)  # the dropped connection, typed as money in flight
    (entry,) = Journal(journal).entries()
    payload = EscrowPayload.from_json(decode_payment_signature(entry.payment_header).payload)
    terms, auth = payload.terms, payload.authorization
    assert terms == entry.terms
    assert (terms.buyer, terms.seller, terms.operator) == (address(BUYER), address(SELLER), address(OPERATOR))
    assert (terms.token, terms.amount) == (chain.token.address, PRICE)
    # The window counts from when the next block is stamped (the pending block's time), not the latest block's.
    assert now + 120 <= terms.deadline <= next_block_time(chain.w3) + 120
    assert terms.request_hash == request_hash("POST", f"{BASE_URL}/echo", b"payload bytes")
    assert auth.valid_before == terms.deadline == entry.valid_before
    assert auth.nonce == entry.escrow_id == chain.escrow.id_of(terms)
    assert entry.body == b"payload bytes"
    # Valid on chain: anyone can deposit exactly what the buyer signed.
    chain.escrow.deposit(chain.sender(STRANGER), terms, auth, payload.signature)
    assert chain.escrow.state_of(entry.escrow_id) is State.HELD


def _tamper_request_hash(response: httpx.Response) -> httpx.Response:
    required = decode_payment_required(response.headers[PAYMENT_REQUIRED_HEADER])
    extra = dict(required.accepts[0].extra or {})
    extra["requestHash"] = "0x" + request_hash("GET", f"{BASE_URL}/report/other").hex()
    required.accepts[0].extra = extra
    headers = response.headers.copy()
    headers[PAYMENT_REQUIRED_HEADER] = encode_payment_required(required)
    return httpx.Response(402, headers=headers, content=response.content)


def test_request_hash_mismatch_is_refused_and_nothing_signed(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    transport = Faulty(shop.transport(), edit_402=_tamper_request_hash)

    async def run() -> None:
        async with client(chain, journal, transport) as buyer:
            await buyer.get("/report/1")

    with pytest.raises(RequestHashMismatch) as info:
        asyncio.run(run())
    assert isinstance(info.value, PaymentRefused) and isinstance(info.value, EscrowError)
    assert "nothing signed, no money moved" in str(info.value)
    assert info.value.expected == request_hash("GET", f"{BASE_URL}/report/1")
    assert transport.paid_sent == 0
    assert Journal(journal).entries() == []


class DenyAll:
    def check(self, request: object, requirements: object, terms: object) -> None:
        raise PolicyDenied("budget exhausted")


def test_policy_denial_signs_nothing(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    transport = Faulty(shop.transport())

    async def run() -> None:
        async with client(chain, journal, transport, policy=DenyAll()) as buyer:
            await buyer.get("/report/1")

    with pytest.raises(PolicyDenied, match="budget exhausted"):
        asyncio.run(run())
    assert transport.paid_sent == 0
    assert Journal(journal).entries() == []


def test_body_differing_from_the_committed_hash_raises(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"

    def swap_body(response: httpx.Response) -> httpx.Response:
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        return httpx.Response(response.status_code, headers=headers, content=b'{"forged":true}')

    async def run() -> None:
        async with client(chain, journal, Faulty(shop.transport(), edit_paid=swap_body)) as buyer:
            await buyer.get("/report/9")

    with pytest.raises(DeliveryMismatch) as info:
        asyncio.run(run())
    assert info.value.received == keccak(b'{"forged":true}')
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.MISMATCH
    assert entry.committed_hash == info.value.committed != info.value.received


def test_handler_failure_is_refunded(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))

    async def run() -> None:
        async with client(chain, journal, shop.transport()) as buyer:
            await buyer.get("/fail")

    with pytest.raises(HandlerFailedRefunded) as info:
        asyncio.run(run())
    assert info.value.status == 503 and info.value.refund_tx is not None
    assert "refunded the payment in tx 0x" in str(info.value)
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.REFUNDED
    assert chain.escrow.state_of(entry.escrow_id) is State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == before


def test_auth_hook_on_an_existing_client(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    auth = EscrowAuth(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=shop.transport(), base_url=BASE_URL, auth=auth) as http:
            return await http.post("/echo", content=b"hello")

    response = asyncio.run(run())
    assert response.content == b"echo:hello"
    (entry,) = auth.journal.entries()
    assert entry.state is PaymentState.DELIVERED
    assert json.loads(json.dumps(entry.headers)) == entry.headers


def test_seller_refusing_the_signed_payment_is_rejected_not_charged(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))

    def other_item(request: httpx.Request) -> None:
        # The payment is replayed against another resource: the seller must refuse it.
        request.url = request.url.copy_with(path="/report/other")

    async def run() -> None:
        async with client(chain, journal, Faulty(shop.transport(), edit_paid_request=other_item)) as buyer:
            await buyer.get("/report/1")

    with pytest.raises(PaymentRejected) as info:
        asyncio.run(run())
    assert info.value.status in (400, 402) and info.value.reason is not None
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.REJECTED
    assert chain.escrow.state_of(entry.escrow_id) is State.NONE
    assert chain.token.balance_of(address(BUYER)) == before


class _Hosts(httpx.AsyncBaseTransport):
    """Each host to its own ASGI app: the shop, and the host its redirect points at."""

    def __init__(self, apps: dict[str, httpx.ASGITransport]) -> None:
        self.apps = apps

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.apps[request.url.host].handle_async_request(request)


def test_a_redirected_delivery_never_carries_the_payment_to_the_next_host(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    # httpx follows the paid request's redirect inside the auth flow's send, building the hop from the paid
    # request: without the client's request hook the next host got PAYMENT-SIGNATURE (the bearer token of the
    # delivery), and the flow judged that host's answer as the paid request's.
    async def moved(scope: Scope, receive: Receive, send: Send) -> None:
        async def redirected(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                location = (b"location", b"http://elsewhere.test/mirror")
                message = {**message, "status": 307, "headers": [*message["headers"], location]}
            await send(message)

        await shop.app(scope, receive, redirected)

    seen: list[str | None] = []

    async def elsewhere(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(scope["headers"]).get(PAYMENT_SIGNATURE_HEADER.lower().encode(), b"").decode() or None)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"another host's page"})

    hosts = _Hosts({"shop.test": httpx.ASGITransport(app=moved), "elsewhere.test": httpx.ASGITransport(app=elsewhere)})
    journal = tmp_path / "buyer.sqlite"

    async def run() -> httpx.Response:
        async with client(chain, journal, hosts, follow_redirects=True) as buyer:
            return await buyer.get("/report/moved")

    response = asyncio.run(run())
    assert seen == [None]  # the next host was asked without the payment
    assert response.content == b"another host's page"
    (paid,) = [hop for hop in response.history if hop.status_code == 307]  # the seller's answer to the payment
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED  # the paid answer (the 307's body) was judged, once
    assert entry.response_hash == delivery_hash(paid.content)
