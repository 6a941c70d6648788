"""The buyer against a serve-first seller (DESIGN.md section 8), real anvil and the real middleware:
journaled delivered-unsettled, closed by recover() when the chain shows the settlement or the
authorization expired unused; the policy may forbid or require a mode; the SDK plugin too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, dev
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_py.buyer import (
    AsyncEscrowClient,
    DeliveryEscrowScheme,
    Journal,
    JournalEntry,
    PaymentNotDelivered,
    PaymentRejected,
    PaymentState,
    Policy,
    PolicyDenied,
    RecoveryAction,
    RecoveryReport,
    ResponseInvalid,
    recover,
)
from escrow_py.buyer._ledger import LedgerStatus
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.seller._poster import PostReport

from .shop import BASE_URL, PRICE, Faulty, Shop, make_shop, serving


def _shop(chain: Chain, tmp_path: Path, settlement: str = "serve-first") -> Shop:
    return make_shop(chain, tmp_path, settlement=settlement, poster_interval=3600.0)


def _flush(shop: Shop) -> PostReport:
    return asyncio.run(shop.middleware.poster.flush())


def _client(chain: Chain, shop: Shop, journal: Path, **options: object) -> AsyncEscrowClient:
    transport = options.pop("transport", shop.transport())
    return AsyncEscrowClient(
        dev(BUYER),
        chain.node.url,
        journal,
        transport=transport,
        base_url=BASE_URL,
        **options,
    )


def _ledger(journal: Path) -> tuple[LedgerStatus, ...]:
    opened = Journal(journal)
    try:
        return tuple(row.status for row in opened.ledger_rows())
    finally:
        opened.close()


def _entries(journal: Path) -> list[JournalEntry]:
    opened = Journal(journal)
    try:
        return opened.entries()
    finally:
        opened.close()


def _recover(chain: Chain, shop: Shop, journal: Path) -> RecoveryReport:
    async def run() -> RecoveryReport:
        async with _client(chain, shop, journal) as client:
            return await client.recover()

    return asyncio.run(run())


def test_a_serve_first_payment_is_unsettled_until_recover_sees_its_settlement(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"

    async def pay() -> httpx.Response:
        async with _client(chain, shop, journal) as client:
            return await client.get("/report/a")

    response = asyncio.run(pay())
    assert response.status_code == 200 and response.json()["item"] == "a"
    (entry,) = _entries(journal)
    assert entry.state is PaymentState.UNSETTLED
    assert entry.response_hash == entry.committed_hash == delivery_hash(response.content)
    assert _ledger(journal) == (LedgerStatus.RESERVED,)  # counted against the budget, not spent yet

    (item,) = _recover(chain, shop, journal).items
    assert (item.action, item.journal_state) == (RecoveryAction.WAITING, PaymentState.UNSETTLED)

    (tx,) = _flush(shop).settle_txs
    (item,) = _recover(chain, shop, journal).items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.NONE,
        RecoveryAction.MARKED_SETTLED,
        PaymentState.DELIVERED,
    )
    assert item.tx_hash == tx
    assert _ledger(journal) == (LedgerStatus.SPENT,)
    assert _recover(chain, shop, journal).items == []  # closed


def test_an_unsettled_payment_is_void_once_its_authorization_expired_unused(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"

    async def pay() -> None:
        async with _client(chain, shop, journal) as client:
            assert (await client.get("/report/never-settled")).status_code == 200

    asyncio.run(pay())
    (entry,) = _entries(journal)
    chain.mine(entry.valid_before)
    (item,) = _recover(chain, shop, journal).items
    assert (item.action, item.journal_state) == (RecoveryAction.MARKED_VOID, PaymentState.VOID)
    assert _ledger(journal) == (LedgerStatus.RELEASED,)  # the budget is back
    # Void is true: the seller's late settlement cannot pull it any more (its loss, not the buyer's).
    report = _flush(shop)
    assert report.lost == [entry.escrow_id] and report.settle_txs == []
    assert not chain.token.authorization_state(entry.terms.buyer, entry.escrow_id)


def test_recover_replays_a_settled_payment_whose_answer_was_lost(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"
    lossy = Faulty(shop.transport(), drop_after=True)

    async def pay() -> None:
        async with _client(chain, shop, journal, transport=lossy) as client:
            await client.get("/report/lost-answer")

    with pytest.raises(PaymentNotDelivered):
        asyncio.run(pay())
    (entry,) = _entries(journal)
    assert entry.state is PaymentState.SIGNED
    _flush(shop)  # the seller settles what it served
    (item,) = _recover(chain, shop, journal).items
    assert (item.action, item.journal_state) == (RecoveryAction.REPLAYED, PaymentState.DELIVERED), item.outcome
    assert item.body is not None and delivery_hash(item.body) == _entries(journal)[0].committed_hash
    assert _ledger(journal) == (LedgerStatus.SPENT,)


def test_a_failed_serve_first_handler_is_a_rejection_with_no_money_moved(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"

    async def pay() -> None:
        async with _client(chain, shop, journal) as client:
            await client.get("/fail")

    with pytest.raises(PaymentRejected) as rejected:
        asyncio.run(pay())
    assert rejected.value.reason == Reason.HANDLER_FAILED_NOT_CHARGED
    (entry,) = _entries(journal)
    assert entry.state is PaymentState.REJECTED
    chain.mine(entry.valid_before)
    (item,) = _recover(chain, shop, journal).items
    assert item.journal_state is PaymentState.VOID
    assert _ledger(journal) == (LedgerStatus.RELEASED,)


@pytest.mark.parametrize(
    ("required", "offered"),
    [("hold", "serve-first"), ("serve-first", "hold")],
)
def test_the_policy_forbids_or_requires_a_settlement_mode(
    chain: Chain, tmp_path: Path, required: str, offered: str
) -> None:
    shop, journal = _shop(chain, tmp_path, offered), tmp_path / "buyer.sqlite"

    async def pay(policy: Policy) -> httpx.Response:
        async with _client(chain, shop, journal, policy=policy) as client:
            return await client.get("/report/p")

    with pytest.raises(PolicyDenied) as denied:
        asyncio.run(pay(Policy(settlement=required)))
    assert denied.value.code == "settlement_not_allowed"
    assert offered in denied.value.reason and required in denied.value.reason
    assert _entries(journal) == []  # nothing signed
    assert shop.calls == {}
    # The mode offered is paid when the policy asks for it.
    assert asyncio.run(pay(Policy(settlement=offered))).status_code == 200
    assert Policy.from_mapping({"settlement": required}).settlement == required
    with pytest.raises(ConfigError, match=r"policy\.settlement must be one of"):
        Policy.from_mapping({"settlement": "later"})


def _sdk_get(chain: Chain, shop: Shop, scheme: DeliveryEscrowScheme, path: str) -> httpx.Response:
    """`path` bought through the official SDK's httpx transport with the plugin, over a real uvicorn."""
    sdk = x402Client().register("eip155:84532", scheme)
    allowed = {"network": "eip155:84532", "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
    sdk.set_spend_controls({"allowed_assets": [allowed]})  # type: ignore[arg-type]
    with serving(shop.app) as url:

        async def run() -> httpx.Response:
            async with localhttp.AsyncClient(
                transport=x402_httpx_transport(sdk, localhttp.AsyncHTTPTransport())
            ) as http:
                return await http.get(f"{url}{path}")

        return asyncio.run(run())


def test_the_sdk_plugin_pays_serve_first_and_recover_closes_it(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, journal)
    response = _sdk_get(chain, shop, scheme, "/report/sdk")
    assert response.status_code == 200
    assert scheme.verify_delivery(response) == response.content
    (entry,) = scheme.core.journal.entries()
    assert entry.state is PaymentState.UNSETTLED
    scheme.core.journal.close()
    _flush(shop)
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.action, item.journal_state) == (RecoveryAction.MARKED_SETTLED, PaymentState.DELIVERED)


def test_a_settled_payment_the_sdk_plugin_never_verified_is_spent_in_the_ledger(chain: Chain, tmp_path: Path) -> None:
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, journal)
    # Paid, and the caller never calls verify_delivery.
    assert _sdk_get(chain, shop, scheme, "/report/unverified").status_code == 200
    scheme.core.journal.close()
    _flush(shop)
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.action, item.journal_state) == (RecoveryAction.WAITING, PaymentState.SIGNED)
    assert "settled on chain (spent)" in item.outcome
    assert _ledger(journal) == (LedgerStatus.SPENT,)


def test_a_rejected_serve_first_body_stays_unsettled_until_the_chain_closes_it(chain: Chain, tmp_path: Path) -> None:
    # main: the validator's verdict journaled the unsettled payment delivered (final, its budget spent) though
    # no money had moved: recover() no longer looked at it, and a seller that never settled kept the budget.
    shop, journal = _shop(chain, tmp_path), tmp_path / "buyer.sqlite"

    async def pay() -> None:
        async with _client(chain, shop, journal, validator=lambda _: False) as client:
            await client.get("/report/rejected-shape")

    with pytest.raises(ResponseInvalid) as raised:
        asyncio.run(pay())
    assert not raised.value.settled and "not settled yet" in str(raised.value)  # not "the money is spent"
    (entry,) = _entries(journal)
    assert entry.state is PaymentState.UNSETTLED and "validation failed" in (entry.detail or "")
    assert _ledger(journal) == (LedgerStatus.RESERVED,)

    chain.mine(entry.valid_before)  # the seller never settled it
    (item,) = _recover(chain, shop, journal).items
    assert (item.action, item.journal_state) == (RecoveryAction.MARKED_VOID, PaymentState.VOID)
    assert _ledger(journal) == (LedgerStatus.RELEASED,)  # the budget is back
