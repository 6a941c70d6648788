"""The SDK plugin through the official x402 httpx transport, and the sync client over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, address, dev
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_py.buyer import AsyncEscrowClient, DeliveryEscrowScheme, EscrowClient, Journal, PaymentState, recover
from escrow_py.terms import State

from .shop import BASE_URL, PRICE, Shop


def test_sdk_client_pays_with_the_registered_scheme(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
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
    (entry,) = Journal(journal).entries()
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
