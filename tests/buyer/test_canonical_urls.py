"""The buyer hashes the URL as it goes over the wire, in the one canonical form, on every path (issue 11).

The seller hashes canonical_url(scheme + Host header + raw target). The buyer's client must
derive the same from what httpx sends (Unicode and %-encoded paths, `+`, repeated and empty
query keys, a trailing `?`, a Host header other than the URL's host); the SDK plugin signs what
the seller computed; recover() replays a request that hashes to the same URL. The end-to-end
matrix against an independent client is the seller's suite; here is the buyer's side.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import localhttp
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import BUYER, dev
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_py.buyer import (
    AsyncEscrowClient,
    DeliveryEscrowScheme,
    EscrowClient,
    Journal,
    PaymentNotDelivered,
    PaymentState,
    recover,
)
from escrow_py.buyer._offer import wire_url
from escrow_py.buyer._recover import replay_request
from escrow_py.protocol.terms import canonical_url, request_hash

from .shop import PRICE, Faulty, LostPayment

# (path and query as the caller writes it, the item the handler must see)
PATHS = [
    ("/report/été-✓?q=a%20b", "été-✓"),
    ("/report/a%20b", "a b"),
    ("/report/a b?x=1 2", "a b"),
    ("/report/p?q=a+b&a=1&a=&b&a=2", "p"),
    ("/report/trailing?", "trailing"),
    ("/report/%7e%41", "~A"),
]


def _server_side_url(request: httpx.Request) -> str:
    """What the seller middleware hashes: scheme, the Host header as received, the raw target."""
    return canonical_url(f"{request.url.scheme}://{request.headers['host']}".encode() + request.url.raw_path)


@pytest.mark.parametrize("host", [None, "shop.test", "Shop.Test:80"])
@pytest.mark.parametrize(("path", "item"), PATHS)
def test_the_hashed_url_is_the_one_the_seller_derives_from_the_wire(path: str, item: str, host: str | None) -> None:
    request = httpx.Request("GET", f"http://127.0.0.1:8123{path}", headers={"Host": host} if host else None)
    assert canonical_url(wire_url(request)) == _server_side_url(request)
    assert request_hash("GET", wire_url(request)) == request_hash("get", _server_side_url(request))


@pytest.mark.parametrize(("path", "item"), PATHS)
def test_the_client_pays_unicode_and_encoded_urls(
    chain: Chain, served: str, tmp_path: Path, path: str, item: str
) -> None:
    journal = tmp_path / "buyer.sqlite"
    with EscrowClient(dev(BUYER), chain.node.url, journal) as client:
        response = client.get(served + path)
    assert response.status_code == 200 and response.json()["item"] == item
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED
    assert entry.url == canonical_url(served + path)


def test_the_client_pays_with_a_host_header_of_its_choosing(chain: Chain, served: str, tmp_path: Path) -> None:
    # Virtual hosting: connect to one address, name another host. The seller hashes the Host header.
    # main: RequestHashMismatch (the client hashed the URL's host).
    journal = tmp_path / "buyer.sqlite"
    with EscrowClient(dev(BUYER), chain.node.url, journal) as client:
        response = client.get(f"{served}/report/été?q=1", headers={"Host": "shop.example"})
    assert response.status_code == 200 and response.json()["item"] == "été"
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED
    assert entry.headers.get("host") == "shop.example"  # the replay must name the same host


def test_recover_replays_a_request_that_hashes_to_the_same_url(chain: Chain, served: str, tmp_path: Path) -> None:
    # The seller serves the paid request, the reply is lost; a later process replays it from the journal.
    journal = tmp_path / "buyer.sqlite"
    path = "/report/été-✓?q=a%20b&q=&r"
    transport = Faulty(localhttp.AsyncHTTPTransport(), drop_after=True)

    async def pay() -> None:
        async with AsyncEscrowClient(dev(BUYER), chain.node.url, journal, transport=transport) as client:
            await client.get(served + path, headers={"Host": "shop.example"})

    with pytest.raises(PaymentNotDelivered) as lost:
        asyncio.run(pay())
    assert isinstance(lost.value.__cause__, LostPayment) and transport.paid_sent == 1
    (entry,) = Journal(journal).entries()
    replay = replay_request(entry)
    assert urlsplit(str(replay.url)).netloc == urlsplit(served).netloc  # same server, same Host, same hash
    assert _server_side_url(replay) == canonical_url(f"http://shop.example{path}")

    item = recover(journal, dev(BUYER), chain.node.url).by_id(entry.escrow_id)
    assert item.journal_state is PaymentState.DELIVERED, item.outcome
    assert item.body is not None and json.loads(item.body)["item"] == "été-✓"


def test_the_sdk_plugin_pays_unicode_urls(chain: Chain, served: str, tmp_path: Path) -> None:
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite")
    sdk = x402Client().register("eip155:84532", scheme)
    allowed = {"network": "eip155:84532", "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
    sdk.set_spend_controls({"allowed_assets": [allowed]})  # type: ignore[arg-type]

    async def run() -> httpx.Response:
        async with localhttp.AsyncClient(transport=x402_httpx_transport(sdk, localhttp.AsyncHTTPTransport())) as http:
            return await http.get(f"{served}/report/été-✓?q=a%20b", headers={"Host": "shop.example"})

    response = asyncio.run(run())
    assert response.status_code == 200 and response.json()["item"] == "été-✓"
    assert scheme.verify_delivery(response) == response.content
    (entry,) = scheme.core.journal.entries()
    assert entry.state is PaymentState.DELIVERED and entry.response_hash == keccak(response.content)
