"""What the delivery poster records for each entry of a deliverMany, over a real uvicorn and the session anvil.

The contract skips an entry that is no longer Held or past its deadline, and puts back to
Held (with PayoutFailed) an entry whose payout the token refused; the transaction succeeds
all the same. Only an entry whose Delivered event is in the receipt is posted; the others
are recorded as what the chain says they became, and a replay's PAYMENT-RESPONSE `state`
says the same. Each race is produced for real: the poster's transaction waits in the pool
(automine off) while the seller's own key settles entries ahead of it with a higher tip,
and the block that includes it is stamped past one entry's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localhttp
import pytest
from eth_utils.crypto import keccak
from fixtures.chain import Chain
from helpers import OPERATOR, SELLER, STRANGER, dev, no_automine, pending_of, until

from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    decode_payment_response,
)
from escrow_py.seller import PostReport
from escrow_py.seller._store import DeliveryStatus

from .payer import Payment, buy
from .shop import Shop, make_shop, served


def _buy(url: str, chain: Chain, path: str, **options: Any) -> Payment:
    async def run() -> Payment:
        async with localhttp.AsyncClient(base_url=url, timeout=60) as client:
            response, payment = await buy(client, chain, "GET", path, **options)
        assert response.status_code == 200, response.text
        return payment

    return asyncio.run(run())


def _replayed_state(url: str, path: str, payment: Payment) -> SettlementExtra:
    """The same PAYMENT-SIGNATURE again: the stored response, with what the seller now says of the escrow."""
    response = localhttp.get(f"{url}{path}", headers={PAYMENT_SIGNATURE_HEADER: payment.header}, timeout=60)
    assert response.status_code == 200, response.text
    return SettlementExtra.from_json(decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER]).extra)


def _delivery_status(shop: Shop, payment: Payment) -> str:
    record = shop.middleware.store.delivery(payment.escrow_id)
    assert record is not None
    return record.status


def _ahead_of_the_poster(chain: Chain, data: bytes) -> None:
    """Send `data` from the seller's own key with a tip far above the operator's: mined before its deliverMany."""
    racer = chain.sender(SELLER)
    # A fixed gas limit: anvil estimates on its pending block, where the poster has settled everything already.
    racer.broadcast(racer.replace(racer.sign(chain.escrow.address, data, gas=300_000), bump=4.0))


@pytest.fixture
def live(chain: Chain, tmp_path: Path) -> Iterator[tuple[Shop, str]]:
    chain.mine()
    # No background passes and no repricing: the test runs the pass and decides when blocks are mined.
    shop = make_shop(chain, tmp_path / "seller.sqlite", poster_interval=3600, reprice_after=120)
    with served(shop.app) as (url, _):
        yield shop, url


def test_only_entries_delivered_by_the_receipt_are_posted_and_the_others_record_why(
    chain: Chain, live: tuple[Shop, str], caplog: pytest.LogCaptureFixture
) -> None:
    shop, url = live
    ours = _buy(url, chain, "/report/ours")
    released = _buy(url, chain, "/report/released")
    refunded = _buy(url, chain, "/report/refunded")
    late = _buy(url, chain, "/report/late", deadline=chain.now() + 40)
    caplog.set_level(logging.INFO, logger="escrow_py")
    reports: list[PostReport] = []
    operator = dev(OPERATOR).address
    with no_automine(chain):
        poster = threading.Thread(target=lambda: reports.append(shop.middleware.poster.post_pending()))
        poster.start()
        # Every entry was Held when the poster looked; its deliverMany of all four now waits in the pool.
        until("the poster's deliverMany in the pool", lambda: pending_of(chain, operator))
        _ahead_of_the_poster(chain, chain.escrow.deliver_data(released.terms, keccak(b"served elsewhere")))
        _ahead_of_the_poster(chain, chain.escrow.refund_data(refunded.terms))
        until("both racers in the pool", lambda: len(pending_of(chain, dev(SELLER).address)) == 2)
        chain.mine(late.terms.deadline)  # one block, at the late entry's deadline: too late for it
        poster.join(60)
    assert not poster.is_alive(), "the poster pass did not finish"
    (report,) = reports

    assert chain.escrow.state_of(ours.escrow_id) == State.RELEASED
    assert chain.escrow.state_of(released.escrow_id) == State.RELEASED
    assert chain.escrow.state_of(refunded.escrow_id) == State.REFUNDED
    assert chain.escrow.state_of(late.escrow_id) == State.HELD
    assert report.posted == [ours.escrow_id]
    assert report.settled == [released.escrow_id]
    assert report.refunded_elsewhere == [refunded.escrow_id]
    assert report.expired == [late.escrow_id]
    assert [_delivery_status(shop, p) for p in (ours, released, refunded, late)] == [
        DeliveryStatus.POSTED,
        DeliveryStatus.SETTLED_ELSEWHERE,
        DeliveryStatus.REFUNDED_ON_CHAIN,
        DeliveryStatus.EXPIRED,
    ]
    # One sale line, for the one delivery our transaction made.
    sales = [r for r in caplog.records if r.name == "escrow_py.seller.sales"]
    assert [(r.sale, r.escrow_id) for r in sales] == [("delivered", "0x" + ours.escrow_id.hex())]  # type: ignore[attr-defined]

    delivered = _replayed_state(url, "/report/ours", ours)
    assert (delivered.state, delivered.delivery_transaction) == (State.RELEASED, report.tx_hash)
    assert _replayed_state(url, "/report/released", released).state is State.RELEASED
    assert _replayed_state(url, "/report/refunded", refunded).state is State.REFUNDED
    assert _replayed_state(url, "/report/late", late).state is State.HELD


def _set_blocked(who: str) -> bytes:
    """BlockingToken.setBlocked(who): a transfer to `who` reverts (the zero address: none)."""
    return keccak(text="setBlocked(address)")[:4] + bytes(12) + bytes.fromhex(who[2:])


@pytest.fixture
def blocking(chain: Chain, tmp_path: Path) -> Iterator[tuple[Shop, str, str]]:
    """A shop selling for a token that can refuse to pay one recipient (BlockingToken)."""
    chain.mine()
    token = chain.deploy_token("BlockingToken")
    shop = make_shop(chain, tmp_path / "seller.sqlite", token=token.address, poster_interval=3600)
    with served(shop.app) as (url, _):
        yield shop, url, token.address


def test_a_refused_payout_stays_pending_and_is_retried_with_backoff_until_it_goes_through(
    chain: Chain, blocking: tuple[Shop, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    shop, url, token = blocking
    payment = _buy(url, chain, "/report/frozen-seller")
    poster = shop.middleware.poster
    chain.deployer.transact(token, _set_blocked(shop.config.pay_to))
    caplog.set_level(logging.WARNING, logger="escrow_py.seller.poster")

    refused = poster.post_pending()
    assert refused.tx_hash is not None  # the deliverMany was mined and succeeded...
    assert refused.posted == [] and refused.payout_refused == [payment.escrow_id]  # ...but delivered nothing
    assert chain.escrow.state_of(payment.escrow_id) == State.HELD
    assert _delivery_status(shop, payment) == DeliveryStatus.PENDING
    assert _replayed_state(url, "/report/frozen-seller", payment).state is State.HELD
    logged = [r.getMessage() for r in caplog.records if payment.escrow_id.hex() in r.getMessage()]
    assert any("refused the payout" in line and "PayoutFailed" in line for line in logged), caplog.text

    # Held back: the next pass at once sends nothing for it.
    nonce = chain.w3.eth.get_transaction_count(dev(OPERATOR).address)
    again = poster.post_pending()
    assert (again.posted, again.payout_refused, again.tx_hash) == ([], [], None)
    assert chain.w3.eth.get_transaction_count(dev(OPERATOR).address) == nonce

    chain.deployer.transact(token, _set_blocked("0x" + "00" * 20))  # the token pays the seller again
    until("the retried delivery", lambda: poster.post_pending().posted == [payment.escrow_id], timeout=30)
    assert chain.escrow.state_of(payment.escrow_id) == State.RELEASED
    assert _delivery_status(shop, payment) == DeliveryStatus.POSTED
    assert _replayed_state(url, "/report/frozen-seller", payment).state is State.RELEASED


def test_a_refused_payout_is_retried_only_until_the_deadline(chain: Chain, blocking: tuple[Shop, str, str]) -> None:
    shop, url, token = blocking
    payment = _buy(url, chain, "/report/never-paid")
    chain.deployer.transact(token, _set_blocked(shop.config.pay_to))
    poster = shop.middleware.poster
    assert poster.post_pending().payout_refused == [payment.escrow_id]
    chain.mine(payment.terms.deadline)
    # Still held back by its backoff, but past its deadline: expired, the buyer's to refund.
    report = poster.post_pending()
    assert report.expired == [payment.escrow_id] and report.tx_hash is None
    assert _delivery_status(shop, payment) == DeliveryStatus.EXPIRED
    assert chain.escrow.state_of(payment.escrow_id) == State.HELD
    assert _replayed_state(url, "/report/never-paid", payment).state is State.HELD
    # Anyone may refund it now (a keeper); the replay then says so.
    chain.escrow.refund(chain.sender(STRANGER), payment.terms)
    assert _replayed_state(url, "/report/never-paid", payment).state is State.REFUNDED
