"""Operator visibility: one INFO line per sale, key=value fields a plain-text log keeps, all under `escrow_py`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, address

import escrow_py
from escrow_py.chain.escrow import Delivered
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, decode_payment_response

from .payer import buy
from .shop import PRICE, make_shop, served

PACKAGE = Path(escrow_py.__file__).resolve().parent


def test_each_sale_is_one_info_line_with_its_fields_in_the_escrow_py_namespace(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain.mine()
    caplog.set_level(logging.DEBUG)
    start = int(chain.w3.eth.block_number) + 1
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=0.1)
    with served(shop.app) as (url, _):

        async def run() -> tuple[httpx.Response, bytes, httpx.Response, bytes]:
            async with localhttp.AsyncClient(base_url=url, timeout=60) as client:
                sold, sold_payment = await buy(client, chain, "GET", "/report/logged?secret=1")
                failed, failed_payment = await buy(client, chain, "GET", "/fail")
            return sold, sold_payment.escrow_id, failed, failed_payment.escrow_id

        sold, sold_id, failed, failed_id = asyncio.run(run())
        assert (sold.status_code, failed.status_code) == (200, 503)
        deadline = time.monotonic() + 30
        while chain.escrow.state_of(sold_id) != State.RELEASED:
            assert time.monotonic() < deadline, "the poster did not deliver"
            time.sleep(0.05)
    deposit_tx = decode_payment_response(sold.headers[PAYMENT_RESPONSE_HEADER]).transaction
    events = chain.escrow.events(start, int(chain.w3.eth.block_number))
    delivery_tx = next(e.at.tx_hash for e in events if isinstance(e, Delivered) and e.id == sold_id)

    sales = [r for r in caplog.records if r.name == "escrow_py.seller.sales"]
    by_id = {i: [r for r in sales if f"escrow_id=0x{i.hex()}" in r.getMessage()] for i in (sold_id, failed_id)}
    assert [len(v) for v in by_id.values()] == [1, 1], [r.getMessage() for r in sales]
    delivered, refunded = by_id[sold_id][0], by_id[failed_id][0]
    assert delivered.levelno == refunded.levelno == logging.INFO
    # A plain-text formatter keeps every field: they are in the message as key=value.
    line = logging.Formatter("%(levelname)s %(name)s %(message)s").format(delivered)
    for field in (
        f"escrow_id=0x{sold_id.hex()}",
        f"amount={PRICE}",
        'route="GET /report/{item}"',
        f"deposit_tx={deposit_tx}",
        f"delivery_tx=0x{delivery_tx.hex()}",
        f"buyer={address(BUYER)}",
    ):
        assert field in line, line
    assert "secret" not in line, "query strings stay out of the log"
    assert line.startswith("INFO escrow_py.seller.sales sale delivered ")
    assert getattr(delivered, "delivery_tx", None) == f"0x{delivery_tx.hex()}"  # and as attributes, for JSON logs
    assert "sale refunded" in refunded.getMessage()
    assert "refund_tx=0x" in refunded.getMessage()
    # One namespace: every record the package emits is under escrow_py.
    ours = [r for r in caplog.records if Path(r.pathname).resolve().is_relative_to(PACKAGE)]
    assert ours
    assert all(r.name == "escrow_py" or r.name.startswith("escrow_py.") for r in ours), {r.name for r in ours}
