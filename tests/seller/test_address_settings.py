"""Every address a seller is configured with goes through the kernel's one address rule (codec.parse_address):
`0x` and 40 hex digits, any case, a wrong EIP-55 checksum refused. eth_utils' `is_address`, which these settings
used, also took an address without `0x`, with `0X`, or as 20 raw bytes; each is now a ConfigError naming the
setting, where it used to be taken (and checksummed) silently.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers import OPERATOR, SELLER, address, dev

from escrow_py.protocol.errors import ConfigError
from escrow_py.seller import DeliveryEscrowServerScheme, FacilitatorSellerConfig, PricedRoute, SellerConfig
from escrow_py.seller._offers import Offers, request_context

GOOD = address(SELLER)  # checksummed
WRONG_SPELLINGS: list[Any] = [
    GOOD[2:],  # no 0x
    "0X" + GOOD[2:].upper(),  # 0X
    bytes.fromhex(GOOD[2:]),  # 20 raw bytes
    GOOD[:-1] + ("a" if GOOD[-1] != "a" else "b"),  # a typo the checksum catches
]
SPELLINGS = ["no-0x", "0X", "raw-bytes", "bad-checksum"]  # the last was refused before too, less clearly
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
ESCROW = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_a_routes_pay_to_must_be_a_0x_address(spelling: Any) -> None:
    with pytest.raises(ConfigError, match=r"PricedRoute GET /x: pay_to \(or a callable\) is not an address"):
        PricedRoute("GET", "/x", amount=1, pay_to=spelling)
    assert PricedRoute("GET", "/x", amount=1, pay_to=GOOD.lower()).pay_to == GOOD  # any case, checksummed


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_the_sdk_server_schemes_addresses_must_be_0x_addresses(spelling: Any) -> None:
    for setting in ("escrow", "operator", "token"):
        with pytest.raises(ConfigError, match=f"DeliveryEscrowServerScheme {setting} is not an address"):
            DeliveryEscrowServerScheme(**{setting: spelling})
    assert DeliveryEscrowServerScheme(operator=GOOD.lower()).operator == GOOD


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_a_facilitator_sellers_pinned_addresses_must_be_0x_addresses(spelling: Any) -> None:
    settings: dict[str, Any] = {
        "facilitator_url": "http://127.0.0.1:1", "api_key": "k", "network": "eip155:84532", "token": TOKEN,
        "pay_to": GOOD, "routes": [],
    }  # fmt: skip
    for setting in ("escrow", "operator"):
        with pytest.raises(ConfigError, match=f"FacilitatorSellerConfig.{setting} is not an address"):
            FacilitatorSellerConfig(**settings, **{setting: spelling})
    assert FacilitatorSellerConfig(**settings, escrow=ESCROW.lower()).escrow == ESCROW


@pytest.mark.parametrize("spelling", WRONG_SPELLINGS, ids=SPELLINGS)
def test_a_dynamic_pay_to_must_give_a_0x_address(tmp_path: Path, spelling: Any) -> None:
    route = PricedRoute("GET", "/x", amount=1, pay_to=lambda _ctx: spelling)
    config = SellerConfig(rpc_url="http://127.0.0.1:1", escrow=ESCROW, token=TOKEN, network="eip155:84532",
                          pay_to=GOOD, operator=dev(OPERATOR), routes=[route], store=tmp_path / "s.sqlite")  # fmt: skip
    scope = {"type": "http", "method": "GET", "path": "/x", "query_string": b"", "headers": [], "scheme": "http",
             "server": ("testserver", 80)}  # fmt: skip
    context = request_context(scope, "http://testserver/x", route, None)
    with pytest.raises(ConfigError, match=r"route GET /x: pay_to is not an address"):
        asyncio.run(Offers(config).terms_of(route, context))
