"""The SDK plugin through the official x402 httpx transport, and the sync client over real HTTP."""

from __future__ import annotations

import asyncio
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, address, dev
from starlette.applications import Starlette
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse

from escrow_py.buyer import (
    AsyncEscrowClient,
    BuyerSettings,
    DeliveryEscrowScheme,
    DeliveryMismatch,
    EscrowClient,
    Journal,
    PaymentError,
    PaymentState,
    ResponseInvalid,
    recover,
)
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    SettlementExtra,
    decode_payment_required,
    encode_payment_response,
)

from .shop import BASE_URL, PRICE, Shop


def test_sdk_client_pays_with_the_registered_scheme(
    chain: Chain, shop: Shop, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    request.addfinalizer(scheme.close)
    sdk = x402Client().register("eip155:84532", scheme)
    # The SDK allows only assets it knows by default; the local TestUSDC is declared with a cap.
    sdk.set_spend_controls(
        {
            "allowed_assets": [
                {"network": "eip155:84532", "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
            ]
        }
    )
    before = chain.token.balance_of(address(BUYER))

    async def run() -> httpx.Response:
        transport = x402_httpx_transport(sdk, shop.transport())
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            return await http.get("/report/sdk")

    response = asyncio.run(run())
    assert response.status_code == 200
    assert scheme.verify_delivery(response) == response.content
    (entry,) = scheme.core.journal.entries()
    assert entry.state is PaymentState.DELIVERED and entry.response_hash == keccak(response.content)
    assert chain.escrow.state_of(entry.escrow_id) is State.HELD
    assert chain.token.balance_of(address(BUYER)) == before - PRICE


def test_sync_client_over_real_http_then_recover_is_idle(chain: Chain, served: str, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    with EscrowClient(dev(BUYER), chain.node.url, journal) as client:
        response = client.get(f"{served}/report/sync")
        assert response.status_code == 200 and response.json()["item"] == "sync"
        free = client.get(f"{served}/nothing-here")
        assert free.status_code == 404  # not a 402: passed through untouched
        assert client.recover().items == []
    with closing(Journal(journal)) as journaled:
        (entry,) = journaled.entries()
    assert entry.state is PaymentState.DELIVERED
    assert recover(journal, dev(BUYER), chain.node.url).items == []


def test_the_clients_pool_keeps_alive_every_connection_it_may_open(chain: Chain, tmp_path: Path) -> None:
    # httpcore 1.0.9 closes "surplus" idle connections once the pool holds more than
    # max_keepalive_connections, and under many threads one already handed to a waiting
    # request (encode/httpcore#1110): the 200-thread budget test failed on it with EBADF.
    def pool_limits(http: httpx.Client | httpx.AsyncClient) -> tuple[int, int]:
        pool = http._transport._pool  # type: ignore[union-attr]
        return pool._max_connections, pool._max_keepalive_connections

    with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "a.sqlite") as client:
        most, kept = pool_limits(client.http)
    assert kept >= most
    chosen = httpx.Limits(max_connections=7, max_keepalive_connections=3)
    with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "b.sqlite", limits=chosen) as client:
        assert pool_limits(client.http) == (7, 3)  # a caller's own limits win

    async def async_limits() -> tuple[int, int]:
        async with AsyncEscrowClient(dev(BUYER), chain.node.url, tmp_path / "c.sqlite") as client:
            return pool_limits(client.http)

    most, kept = asyncio.run(async_limits())
    assert kept >= most


def _tampering(app: ASGIApp) -> ASGIApp:
    """A seller (or a proxy) that alters the paid body after committing to its hash."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def altered(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": message["body"].replace(b"sdk", b"SDK")}
            await send(message)

        await app(scope, receive, altered)

    return wrapped


def test_the_sdk_plugin_checks_the_delivery_itself_as_a_response_hook(
    chain: Chain, shop: Shop, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    request.addfinalizer(scheme.close)
    sdk = x402Client().register("eip155:84532", scheme)
    sdk.set_spend_controls({"allowed_assets": [{"network": "eip155:84532", "asset": chain.token.address}]})

    async def get(app: ASGIApp, path: str) -> httpx.Response:
        transport = x402_httpx_transport(sdk, httpx.ASGITransport(app=app))
        hooks = {"response": [scheme.check_response]}
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, event_hooks=hooks) as http:
            return await http.get(path)

    fine = asyncio.run(get(shop.app, "/report/fine"))
    assert fine.status_code == 200
    entry = next(e for e in scheme.core.journal.entries() if e.state is PaymentState.DELIVERED)
    assert entry.response_hash == keccak(fine.content)  # judged by the hook, with no call by the caller

    with pytest.raises(DeliveryMismatch):
        asyncio.run(get(_tampering(shop.app), "/report/sdk"))
    assert any(e.state is PaymentState.MISMATCH for e in scheme.core.journal.entries())


def test_the_sdks_spend_controls_see_delivery_escrow_offers_of_its_own_usdc(
    chain: Chain, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Without find_default_asset on the plugin, the SDK's default spend controls drop every
    # delivery-escrow offer, even one in Base Sepolia USDC, and the client silently pays exact.
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    request.addfinalizer(scheme.close)
    reached: list[str] = []

    def policy(version: int, offers: list[Any]) -> list[Any]:
        reached.extend(o.asset for o in offers)
        return offers

    sdk = x402Client().register("eip155:84532", scheme).register_policy(policy)
    usdc = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    extra = {"name": "USDC", "version": "2", "escrow": chain.escrow.address, "operator": address(BUYER)}
    offer = PaymentRequirements(
        scheme="delivery-escrow", network="eip155:84532", asset=usdc, amount="10000",
        pay_to=address(BUYER), max_timeout_seconds=120, extra={**extra, "requestHash": "0x" + "00" * 32},
    )  # fmt: skip
    required = PaymentRequired(x402_version=2, resource=ResourceInfo(url="http://shop.test/x"), accepts=[offer])
    with pytest.raises(PaymentError):  # refused later by the plugin itself: no USDC on this chain
        asyncio.run(sdk.create_payment_payload(required))
    assert reached == [usdc]


def test_one_settings_object_serves_the_client_the_sdk_plugin_and_recover(
    chain: Chain, shop: Shop, served: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The validator wants a key the shop's reports never have: every verified delivery is rejected by it.
    settings = BuyerSettings(
        dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite", task="research", validator={"required": ["nope"]}
    )
    with EscrowClient(settings) as client, pytest.raises(ResponseInvalid, match="'nope' is a required property"):
        client.get(f"{served}/report/client")
    scheme = DeliveryEscrowScheme(settings)
    request.addfinalizer(scheme.close)
    sdk = x402Client().register("eip155:84532", scheme)
    sdk.set_spend_controls({"allowed_assets": [{"network": "eip155:84532", "asset": chain.token.address}]})

    async def run() -> httpx.Response:
        transport = x402_httpx_transport(sdk, shop.transport())
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            return await http.get("/report/sdk")

    with pytest.raises(ResponseInvalid):  # the plugin applies the settings' validator as the client does
        scheme.verify_delivery(asyncio.run(run()))
    entries = scheme.core.journal.entries()
    assert [e.state for e in entries] == [PaymentState.DELIVERED] * 2
    assert all((e.detail or "").startswith("validation failed") for e in entries)
    assert {row.task for row in scheme.core.journal.ledger_rows()} == {"research"}
    assert recover(settings).items == []
    with pytest.raises(ConfigError, match="not both"):
        EscrowClient(settings, task="other")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['timeout'\\]"):
        DeliveryEscrowScheme(settings, timeout=5)


def _naming(
    escrow_id: bytes, deadline: int, status: int, body: bytes, committed: bytes = b"a body never served", **settle: Any
) -> ASGIApp:
    """Another host, answering every request with a receipt that names `escrow_id` (escrow ids are public)
    and commits to the body `committed`."""
    extra = SettlementExtra(escrow_id=escrow_id, deadline=deadline, delivery_hash=keccak(committed))
    receipt = SettleResponse(transaction="", network="eip155:84532", extra=extra.to_json(), **settle)
    headers = {PAYMENT_RESPONSE_HEADER: encode_payment_response(receipt)}
    return Starlette(routes=[Route("/{path:path}", lambda _: StarletteResponse(body, status, headers=headers))])


@pytest.mark.parametrize(
    ("status", "settle"),
    [
        (200, {"success": True}),  # a body that is not the one committed: would be journaled a mismatch
        (500, {"success": False, "error_reason": "handler_failed_not_charged"}),  # would be journaled rejected
    ],
    ids=["mismatch", "not-charged"],
)
def test_a_receipt_naming_a_payment_already_judged_rewrites_nothing(
    chain: Chain, shop: Shop, tmp_path: Path, request: pytest.FixtureRequest, status: int, settle: dict[str, Any]
) -> None:
    # main: the hook judged whatever journaled escrow a response named, again: any host the client talked to
    # could turn a delivered payment into a mismatch (its hashes replaced by the host's) or a rejection.
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    request.addfinalizer(scheme.close)
    sdk = x402Client().register("eip155:84532", scheme)
    sdk.set_spend_controls({"allowed_assets": [{"network": "eip155:84532", "asset": chain.token.address}]})
    hooks = {"response": [scheme.check_response]}

    async def get(transport: httpx.AsyncBaseTransport, path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, event_hooks=hooks) as http:
            return await http.get(path)

    paid = asyncio.run(get(x402_httpx_transport(sdk, httpx.ASGITransport(app=shop.app)), "/report/judged"))
    (delivered,) = scheme.core.journal.entries()
    assert delivered.state is PaymentState.DELIVERED and delivered.response_hash == keccak(paid.content)
    assert scheme.verify_delivery(paid) == paid.content  # the same answer judged again by hand: still delivered

    liar = _naming(delivered.escrow_id, delivered.terms.deadline, status, b"forged", **settle)
    with pytest.raises(PaymentError, match="already judged delivered") as refused:
        asyncio.run(get(httpx.ASGITransport(app=liar), "/anything"))
    assert refused.value.escrow_id == delivered.escrow_id
    assert scheme.core.journal.get(delivered.escrow_id) == delivered  # state, hashes and detail as they were


def test_a_receipt_naming_a_payment_for_another_request_is_not_its_delivery(
    chain: Chain, shop: Shop, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # main: the hook judged the escrow a response named whatever request the response answered: a host that
    # named another request's payment still in flight had its own bytes journaled as that payment's delivery.
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    request.addfinalizer(scheme.close)

    async def offer() -> PaymentRequirements:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shop.app), base_url=BASE_URL) as http:
            refused = await http.get("/report/in-flight")
        return decode_payment_required(refused.headers[PAYMENT_REQUIRED_HEADER]).accepts[0]

    scheme.create_payment_payload(asyncio.run(offer()))  # signed and journaled, its request not answered yet
    (in_flight,) = scheme.core.journal.entries()

    async def get(app: ASGIApp, path: str) -> httpx.Response:
        hooks = {"response": [scheme.check_response]}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, event_hooks=hooks) as http:
            return await http.get(path)

    liar = _naming(in_flight.escrow_id, in_flight.terms.deadline, 200, b"forged", committed=b"forged", success=True)
    with pytest.raises(PaymentError, match="another request") as refused:
        asyncio.run(get(liar, "/anything"))
    assert refused.value.escrow_id == in_flight.escrow_id
    assert scheme.core.journal.get(in_flight.escrow_id) == in_flight  # still signed, still owed its delivery
