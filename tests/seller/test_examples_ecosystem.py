"""The ecosystem examples (examples/ecosystem/) run as a user would run them, against anvil over real HTTP."""

from __future__ import annotations

import asyncio
import runpy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import localhttp
import pytest
from fixtures.chain import BUYER2, Chain
from helpers import BUYER, OPERATOR, SELLER, SELLER2, address, dev
from x402.extensions.bazaar import BAZAAR, QueryDiscoveryInfo, QueryInput, validate_and_extract
from x402.http import decode_payment_required_header

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import AsyncEscrowClient, PaymentRejected

from .sdk_parts import exact_facilitator, stock_client
from .shop import deposits, served

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ecosystem"


@contextmanager
def example_app(name: str, chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Iterator[str]:
    """Load examples/ecosystem/<name>.py with the settings a user exports, serve its `app` on uvicorn."""
    monkeypatch.chdir(tmp_path)
    settings = {
        "X402_ESCROW_RPC_URL": chain.node.url,
        "X402_ESCROW_ADDRESS": chain.escrow.address,
        "X402_ESCROW_TOKEN": chain.token.address,
        "SELLER_ADDRESS": address(SELLER),
        "SELLER_OPERATOR_KEY": dev_private_key(OPERATOR),
        **env,
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    chain.mine()
    app = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=name)["app"]
    with served(app) as (base, _):
        yield base


def _required(url: str) -> Any:
    response = localhttp.get(url)
    assert response.status_code == 402
    return decode_payment_required_header(response.headers["payment-required"])


def _escrow_get(chain: Chain, url: str, journal: Path, buyer: int = BUYER) -> httpx.Response:
    async def run() -> httpx.Response:
        async with AsyncEscrowClient(dev(buyer), chain.node.url, journal, timeout=60) as client:
            return await client.get(url)

    return asyncio.run(run())


def test_seller_both_schemes(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from x402.http.clients.httpx import x402_httpx_transport

    async def stock_get(url: str) -> httpx.Response:
        transport = x402_httpx_transport(stock_client(chain, BUYER2), localhttp.AsyncHTTPTransport())
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            return await http.get(url)

    with exact_facilitator(chain) as facilitator:
        env = {"X402_FACILITATOR_URL": facilitator.url}
        with example_app("seller_both_schemes", chain, monkeypatch, tmp_path, **env) as base:
            assert [a.scheme for a in _required(f"{base}/report/a").accepts] == ["delivery-escrow", "exact"]
            assert [a.scheme for a in _required(f"{base}/archive/a").accepts] == ["delivery-escrow"]
            before = chain.token.balance_of(address(SELLER))
            assert asyncio.run(stock_get(f"{base}/report/stock")).status_code == 200
            assert chain.token.balance_of(address(SELLER)) == before + 10_000  # "$0.01"
            start = int(chain.w3.eth.block_number) + 1
            assert _escrow_get(chain, f"{base}/archive/ours", tmp_path / "b.sqlite").status_code == 200
            (deposit,) = deposits(chain, start)
            assert deposit.terms.amount == 50_000


def test_seller_dynamic_price(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"PARTNER_ADDRESS": address(SELLER2)}
    with example_app("seller_dynamic_price", chain, monkeypatch, tmp_path, **env) as base:
        small, large = _required(f"{base}/report/a"), _required(f"{base}/report/a?size=large")
        assert (small.accepts[0].amount, large.accepts[0].amount) == ("10000", "50000")
        start = int(chain.w3.eth.block_number) + 1
        paid = _escrow_get(chain, f"{base}/report/partner-1?size=large", tmp_path / "b.sqlite")
        assert paid.json() == {"item": "partner-1", "size": "large"}
        (deposit,) = deposits(chain, start)
        assert (deposit.terms.amount, deposit.terms.seller) == (50_000, address(SELLER2))


def test_seller_discovery(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with example_app("seller_discovery", chain, monkeypatch, tmp_path) as base:
        required = _required(f"{base}/weather/Paris?units=imperial")
        bazaar = required.extensions[BAZAAR.key]
        extracted = validate_and_extract(bazaar)
        assert extracted.valid, extracted.errors
        assert isinstance(extracted.info, QueryDiscoveryInfo) and isinstance(extracted.info.input, QueryInput)
        assert extracted.info.input.path_params == {"city": "Paris"} and bazaar["info"]["settlement"] == "hold"
        assert required.accepts[0].amount == "2000"
        assert _escrow_get(chain, f"{base}/weather/Paris", tmp_path / "b.sqlite").json()["temperature"] == 21.5


def test_seller_hooks(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"BLOCKED_PAYERS": address(BUYER2)}
    with example_app("seller_hooks", chain, monkeypatch, tmp_path, **env) as base:
        start = int(chain.w3.eth.block_number) + 1
        with pytest.raises(PaymentRejected, match="payer_blocked"):
            _escrow_get(chain, f"{base}/report/x", tmp_path / "b2.sqlite", buyer=BUYER2)
        assert deposits(chain, start) == []
        assert _escrow_get(chain, f"{base}/report/x", tmp_path / "b.sqlite").status_code == 200
        line = f"delivery-escrow {address(BUYER)} 10000\n"
        assert (tmp_path / "sales.log").read_text() == line
        served_first = _escrow_get(chain, f"{base}/quote/x", tmp_path / "b.sqlite")
        assert served_first.status_code == 200 and served_first.json() == {"quote": "x"}
        with pytest.raises(PaymentRejected, match="quote_withdrawn"):
            _escrow_get(chain, f"{base}/quote/stale", tmp_path / "b.sqlite")
        # The poster settles the quote in the background; its after-settle hook books it then.
        deadline = time.monotonic() + 60
        while (tmp_path / "sales.log").read_text() == line:
            assert time.monotonic() < deadline, "the serve-first settlement was not booked"
            time.sleep(0.1)
    assert (tmp_path / "sales.log").read_text() == line * 2  # the withdrawn quote was never booked nor charged


def test_sdk_buyer(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("X402_ESCROW_PRIVATE_KEY", dev_private_key(BUYER))
    with example_app("seller_hooks", chain, monkeypatch, tmp_path) as base:
        main = runpy.run_path(str(EXAMPLES / "sdk_buyer.py"), run_name="example")["main"]
        body = asyncio.run(main(f"{base}/report/sdk"))
    assert body == b'{"item":"sdk"}'


def test_sdk_seller(chain: Chain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from x402.http.clients.httpx import x402_httpx_transport

    from escrow_devtools.bench.http import _facilitator_app as facilitator_app

    from .test_sdk_server_scheme import EscrowKindListing

    async def stock_get(url: str) -> httpx.Response:
        transport = x402_httpx_transport(stock_client(chain, BUYER2), localhttp.AsyncHTTPTransport())
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            return await http.get(url)

    with (
        exact_facilitator(chain) as exact,
        served(facilitator_app(EscrowKindListing(chain))) as (escrow_url, _),
    ):
        env = {"X402_FACILITATOR_URL": exact.url, "ESCROW_FACILITATOR_URL": escrow_url}
        with example_app("sdk_seller", chain, monkeypatch, tmp_path, **env) as base:
            required = _required(f"{base}/report/a")
            assert [a.scheme for a in required.accepts] == ["delivery-escrow", "exact"]
            assert {a.amount for a in required.accepts} == {"10000"}
            assert required.accepts[0].extra["operator"] == address(OPERATOR)
            before = chain.token.balance_of(address(SELLER))
            assert asyncio.run(stock_get(f"{base}/report/stock")).status_code == 200
            assert chain.token.balance_of(address(SELLER)) == before + 10_000
