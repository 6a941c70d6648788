"""recover(): every branch against real chain state, and replay through the real seller."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from eth_utils.crypto import keccak
from fastapi import FastAPI
from fastapi.responses import Response
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, STRANGER, address, dev, expect_revert, make_terms
from helpers import deposit as deposit_terms

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import (
    AsyncEscrowClient,
    BuyerSettings,
    Journal,
    JournalEntry,
    PaymentNotDelivered,
    PaymentState,
    RecoveryAction,
    arecover,
    delivered_hash,
    recover,
)
from escrow_py.buyer._core import PaymentCore
from escrow_py.buyer._offer import Offer
from escrow_py.protocol.terms import State, delivery_hash, request_hash
from escrow_py.protocol.wire import (
    EscrowExtra,
    EscrowPayload,
    EscrowRequirements,
    decode_payment_signature,
    payment_required,
)

from .shop import BASE_URL, PRICE, Faulty, LostPayment, Shop

URL = "http://other.test/thing"


def journaled(chain: Chain, journal: Path, *, url: str = URL, window: int = 120) -> tuple[JournalEntry, EscrowPayload]:
    """A payment signed and journaled by the buyer's own code, never sent."""
    core = PaymentCore(BuyerSettings(dev(BUYER), chain.node.url, journal))
    req = EscrowRequirements(
        network="eip155:84532",
        amount=PRICE,
        asset=chain.token.address,
        pay_to=address(SELLER),
        max_timeout_seconds=window,
        extra=EscrowExtra(
            name="USDC",
            version="2",
            escrow=chain.escrow.address,
            operator=address(OPERATOR),
            request_hash=request_hash("GET", url),
        ),
    )
    request = httpx.Request("GET", url)
    offer = Offer(payment_required(url, [req.to_model()]), req.to_model(), req)
    prepared = core.prepare(request, offer)
    entry = core.journal.get(prepared.escrow_id)
    core.journal.close()
    assert entry is not None
    return entry, EscrowPayload.from_json(decode_payment_signature(entry.payment_header).payload)


def deposit(chain: Chain, payload: EscrowPayload) -> None:
    chain.escrow.deposit(chain.sender(STRANGER), payload.terms, payload.authorization, payload.signature)


def test_held_past_deadline_is_refunded_by_the_buyer(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    before = chain.token.balance_of(address(BUYER))
    deposit(chain, payload)
    chain.mine(entry.terms.deadline)
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.HELD,
        RecoveryAction.REFUNDED,
        PaymentState.REFUNDED,
    )
    assert item.tx_hash is not None
    assert chain.escrow.state_of(entry.escrow_id) is State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == before
    assert recover(journal, dev(BUYER), chain.node.url).items == []  # finished payments are left alone


def test_held_past_deadline_can_be_left_to_the_keeper(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    deposit(chain, payload)
    chain.mine(entry.terms.deadline)
    (item,) = recover(journal, dev(BUYER), chain.node.url, refund_expired=False).items
    assert (item.action, item.journal_state) == (RecoveryAction.LEFT_TO_KEEPER, PaymentState.HELD)
    assert chain.escrow.state_of(entry.escrow_id) is State.HELD


def test_refunded_by_the_operator_is_recorded(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    deposit(chain, payload)
    chain.escrow.refund(chain.sender(OPERATOR), payload.terms)
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.chain_state, item.action) == (State.REFUNDED, RecoveryAction.MARKED_REFUNDED)
    got = Journal(journal).get(entry.escrow_id)
    assert got is not None and got.state is PaymentState.REFUNDED


def test_never_deposited_is_void_only_after_the_authorization_expires(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.NONE,
        RecoveryAction.WAITING,
        PaymentState.SIGNED,
    )
    chain.set_next_timestamp(entry.valid_before)
    chain.mine()
    (item,) = recover(journal, dev(BUYER), chain.node.url).items
    assert (item.action, item.journal_state) == (RecoveryAction.MARKED_VOID, PaymentState.VOID)
    # Void is true: the expired authorization can no longer be deposited.
    with expect_revert("DeadlinePassed", deadline=entry.valid_before):
        deposit(chain, payload)


def test_released_with_other_bytes_is_a_mismatch(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    deposit(chain, payload)
    chain.escrow.deliver(chain.sender(OPERATOR), payload.terms, keccak(b"what was promised"))
    app = FastAPI()

    @app.get("/thing")
    async def thing() -> Response:
        return Response(b"something else")

    report = asyncio.run(arecover(journal, dev(BUYER), chain.node.url, transport=httpx.ASGITransport(app=app)))
    (item,) = report.items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.RELEASED,
        RecoveryAction.REPLAYED,
        PaymentState.MISMATCH,
    )
    got = Journal(journal).get(entry.escrow_id)
    assert got is not None
    assert (got.committed_hash, got.response_hash) == (keccak(b"what was promised"), keccak(b"something else"))


def _lose_the_answer(chain: Chain, shop: Shop, journal: Path) -> JournalEntry:
    """Pay; the seller serves, but the buyer's process dies before it reads the answer."""

    async def run() -> None:
        transport = Faulty(shop.transport(), drop_after=True)
        async with AsyncEscrowClient(dev(BUYER), chain.node.url, journal, transport=transport, base_url=BASE_URL) as c:
            await c.get("/report/5")

    with pytest.raises(PaymentNotDelivered) as lost:
        asyncio.run(run())
    assert isinstance(lost.value.__cause__, LostPayment)  # the dropped connection, typed as money in flight
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.SIGNED
    return entry


def test_released_is_replayed_and_checked_against_the_chain(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry = _lose_the_answer(chain, shop, journal)
    asyncio.run(shop.middleware.poster.flush())
    assert chain.escrow.state_of(entry.escrow_id) is State.RELEASED
    report = asyncio.run(arecover(journal, dev(BUYER), chain.node.url, transport=shop.transport()))
    (item,) = report.items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.RELEASED,
        RecoveryAction.REPLAYED,
        PaymentState.DELIVERED,
    )
    got = Journal(journal).get(entry.escrow_id)
    assert got is not None
    assert got.response_hash == delivered_hash(chain.w3, chain.escrow.address, entry.escrow_id)
    assert item.body is not None and json.loads(item.body) == {"item": "5", "call": 1}  # the bytes, handed back
    assert shop.calls["report"] == 1  # redelivered from the seller's store, not served twice


def test_held_in_time_is_replayed(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry = _lose_the_answer(chain, shop, journal)
    balance = chain.token.balance_of(address(BUYER))
    report = asyncio.run(arecover(journal, dev(BUYER), chain.node.url, transport=shop.transport()))
    (item,) = report.items
    assert (item.chain_state, item.action, item.journal_state) == (
        State.HELD,
        RecoveryAction.REPLAYED,
        PaymentState.DELIVERED,
    )
    assert item.body is not None and json.loads(item.body) == {"item": "5", "call": 1}
    assert chain.token.balance_of(address(BUYER)) == balance  # no second charge
    assert shop.calls["report"] == 1
    assert chain.escrow.state_of(entry.escrow_id) is State.HELD  # delivered bytes; the seller posts the hash later


def test_recover_in_a_new_process_from_the_journal_alone(chain: Chain, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    entry, payload = journaled(chain, journal)
    deposit(chain, payload)
    chain.mine(entry.terms.deadline)
    script = (
        "import json, sys\n"
        "from escrow_py.buyer import recover\n"
        "from escrow_py.chain.signer import LocalSigner\n"
        "report = recover(sys.argv[1], LocalSigner.from_env('BUYER_KEY'), sys.argv[2])\n"
        "print(json.dumps([[i.escrow_id.hex(), i.action.value, i.journal_state.value] for i in report.items]))\n"
    )
    env = {**os.environ, "BUYER_KEY": dev_private_key(BUYER)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(journal), chain.node.url],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == [[entry.escrow_id.hex(), "refunded", "refunded"]]
    assert chain.escrow.state_of(entry.escrow_id) is State.REFUNDED


def test_delivered_hash_follows_the_sellers_pointer_or_searches_from_the_signing_time(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit_terms(chain, terms)
    signed_at = chain.now()
    receipt = chain.escrow.deliver(chain.sender(SELLER), terms, delivery_hash(b"bytes"))
    tx = bytes(receipt["transactionHash"])
    escrow_id = chain.escrow.id_of(terms)
    after = int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]) + 1
    chain.mine(after)
    assert delivered_hash(chain.w3, chain.escrow.address, escrow_id, since=signed_at) == delivery_hash(b"bytes")
    assert delivered_hash(chain.w3, chain.escrow.address, escrow_id, since=after) is None  # the search is bounded
    assert delivered_hash(chain.w3, chain.escrow.address, escrow_id, since=after, tx_hash=tx) == delivery_hash(b"bytes")
    # A pointer to a transaction without this escrow's delivery is not believed; the search decides.
    assert delivered_hash(chain.w3, chain.escrow.address, escrow_id, since=signed_at, tx_hash=os.urandom(32)) == (
        delivery_hash(b"bytes")
    )
