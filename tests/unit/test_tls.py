"""Every HTTP client the package builds shares one verifying TLS context (escrow_py.protocol.tls).

httpx would build a new one per client, loading certifi's roots each time (about 50 ms of CPU):
the clients below must build none once the process has its context, and verify as httpx does.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import BUYER, dev

from escrow_py.buyer import AsyncEscrowClient, BuyerSettings, EscrowClient
from escrow_py.protocol.tls import client_options, tls_context
from escrow_py.seller._remote import FacilitatorClient, FacilitatorSellerConfig

ADDRESS = "0x" + "11" * 20


@pytest.fixture
def contexts_built(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each SSLContext built with verification from here on (httpx's default path calls this)."""
    tls_context()  # the process's own, built before counting
    built: list[object] = []
    real = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args or kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    return built


def test_the_shared_context_verifies_certificates_and_host_names() -> None:
    context = tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.get_ca_certs() or context.cert_store_stats()["x509_ca"] > 0
    assert tls_context() is context


def test_buyer_clients_build_no_context_of_their_own(tmp_path: Path, contexts_built: list[object]) -> None:
    settings = BuyerSettings(dev(BUYER), "http://127.0.0.1:1", tmp_path / "buyer.sqlite")
    for _ in range(3):
        with EscrowClient(settings) as client:
            assert isinstance(client.http, httpx.Client)

    async def build() -> None:
        async with AsyncEscrowClient(settings) as client:
            assert isinstance(client.http, httpx.AsyncClient)

    asyncio.run(build())
    assert contexts_built == []


def test_the_sellers_facilitator_client_builds_no_context_of_its_own(contexts_built: list[object]) -> None:
    config = FacilitatorSellerConfig(
        facilitator_url="https://facilitator.example", api_key="k", network="eip155:84532",
        token=ADDRESS, pay_to=ADDRESS, routes=[],
    )  # fmt: skip
    facilitator = FacilitatorClient(config)

    async def one_loop() -> None:  # a new event loop each time: a new httpx client each time
        facilitator._http()
        await facilitator.aclose()

    for _ in range(3):
        asyncio.run(one_loop())
    assert contexts_built == []


def test_a_caller_who_chose_tls_settings_gets_httpx_own() -> None:
    assert client_options({"timeout": 5}) == {"timeout": 5, "verify": tls_context()}
    for chosen in ({"verify": False}, {"verify": "/etc/ssl/certs/ca.pem"}, {"trust_env": False}, {"http2": True}):
        assert client_options(chosen) == chosen
