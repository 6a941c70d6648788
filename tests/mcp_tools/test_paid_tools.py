"""Paid MCP tools end to end: the official `mcp` client and server over streamable HTTP (uvicorn), real anvil.

Covers the paid call (the committed hash is keccak256 of the text's UTF-8 bytes as the client
decodes them), replay of the same payment, a result that differs from the committed hash, a
payment for other arguments, a failing tool's instant refund, and an agent SIGKILLed mid-call
that a new session's recover() pays off: the result by replay, or the refund after the deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev, until
from mcp import types
from x402.mcp import MCP_PAYMENT_RESPONSE_META_KEY

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import (
    DeliveryMismatch,
    HandlerFailedRefunded,
    PaymentState,
    RecoveryAction,
    RecoveryReport,
    delivered_hash,
)
from escrow_py.mcp import EscrowToolClient, delivered_bytes
from escrow_py.mcp._wire import payment_meta
from escrow_py.protocol.terms import State, delivery_hash

from .shop import PRICE, SLOW_TIMEOUT, ToolShop, mcp_session, tool_shop

AGENT = Path(__file__).with_name("agent.py")


def _client(session: object, chain: Chain, journal: Path) -> EscrowToolClient:
    return EscrowToolClient(session, dev(BUYER), chain.node.url, journal)  # type: ignore[arg-type]


def _text(result: types.CallToolResult) -> str:
    item = result.content[0]
    assert isinstance(item, types.TextContent)
    return item.text


def test_a_paid_call_returns_the_bytes_whose_hash_the_seller_commits_on_chain(
    chain: Chain, shop: ToolShop, tmp_path: Path
) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))
    seller_before = chain.token.balance_of(address(SELLER))

    async def call() -> types.CallToolResult:
        async with mcp_session(shop.url) as session, _client(session, chain, tmp_path / "buyer.sqlite") as tools:
            return await tools.call_tool("score", {"item": "abc"})

    result = asyncio.run(call())
    text = _text(result)
    # Non-ASCII travels as itself: the hashed bytes are the UTF-8 of the very string the client decoded.
    assert json.loads(text) == {"item": "abc", "note": "été ✓", "score": 7}
    assert "été ✓" in text
    settle = result.meta[MCP_PAYMENT_RESPONSE_META_KEY]  # type: ignore[index]
    committed = bytes.fromhex(settle["extra"]["deliveryHash"].removeprefix("0x"))
    assert committed == delivery_hash(text.encode("utf-8")) == delivery_hash(delivered_bytes(result) or b"")
    escrow_id = bytes.fromhex(settle["extra"]["escrowId"].removeprefix("0x"))
    on_chain = until("the delivery on chain", lambda: delivered_hash(chain.w3, chain.escrow.address, escrow_id))
    assert on_chain == committed
    assert chain.escrow.state_of(escrow_id) == State.RELEASED
    assert chain.token.balance_of(address(BUYER)) == buyer_before - PRICE
    assert chain.token.balance_of(address(SELLER)) == seller_before + PRICE
    assert shop.calls["ran:score"] == 1
    from escrow_py.buyer import Journal

    journal = Journal(tmp_path / "buyer.sqlite")
    entry = journal.get(escrow_id)
    journal.close()
    assert entry is not None and entry.state is PaymentState.DELIVERED
    assert entry.url == "mcp://tool/score" and entry.method == "POST"
    assert entry.body == b'{"item":"abc"}'


def test_an_unpaid_call_gets_the_offer_bound_to_its_tool_and_arguments(shop: ToolShop) -> None:
    async def call() -> types.CallToolResult:
        async with mcp_session(shop.url) as session:
            return await session.call_tool("score", {"item": "abc"})

    result = asyncio.run(call())
    assert result.isError
    required = result.structuredContent
    assert required is not None and required["resource"]["url"] == "mcp://tool/score"
    offer = required["accepts"][0]
    assert offer["scheme"] == "delivery-escrow" and offer["amount"] == str(PRICE)
    from escrow_py.mcp import canonical_arguments
    from escrow_py.protocol.terms import request_hash

    expected = request_hash("POST", "mcp://tool/score", canonical_arguments({"item": "abc"}))
    assert offer["extra"]["requestHash"] == "0x" + expected.hex()
    assert "ran:score" not in shop.calls


def test_a_free_tool_runs_without_payment(shop: ToolShop) -> None:
    async def call() -> types.CallToolResult:
        async with mcp_session(shop.url) as session:
            return await session.call_tool("free", {})

    result = asyncio.run(call())
    assert not result.isError and _text(result) == "free of charge"


def test_the_same_payment_again_replays_the_stored_result_without_a_second_charge(
    chain: Chain, shop: ToolShop, tmp_path: Path
) -> None:
    journal_path = tmp_path / "buyer.sqlite"

    async def run() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with mcp_session(shop.url) as session, _client(session, chain, journal_path) as tools:
            paid = await tools.call_tool("score", {"item": "abc"})
            (entry,) = tools.journal.entries()
        async with mcp_session(shop.url) as session:  # another session: a restarted agent
            again = await session.call_tool("score", {"item": "abc"}, meta=payment_meta(entry.payment_header))
        return paid, again

    buyer_before = chain.token.balance_of(address(BUYER))
    paid, again = asyncio.run(run())
    assert not again.isError
    assert _text(again) == _text(paid)
    first = paid.meta[MCP_PAYMENT_RESPONSE_META_KEY]["extra"]  # type: ignore[index]
    second = again.meta[MCP_PAYMENT_RESPONSE_META_KEY]["extra"]  # type: ignore[index]
    assert (second["escrowId"], second["deliveryHash"]) == (first["escrowId"], first["deliveryHash"])
    assert shop.calls["ran:score"] == 1
    assert chain.token.balance_of(address(BUYER)) == buyer_before - PRICE


def test_a_payment_for_other_arguments_is_refused(chain: Chain, shop: ToolShop, tmp_path: Path) -> None:
    async def run() -> types.CallToolResult:
        async with mcp_session(shop.url) as session, _client(session, chain, tmp_path / "b.sqlite") as tools:
            await tools.call_tool("score", {"item": "cheap"})
            (entry,) = tools.journal.entries()
            return await session.call_tool("score", {"item": "dear"}, meta=payment_meta(entry.payment_header))

    result = asyncio.run(run())
    assert result.isError
    assert result.structuredContent is not None
    assert result.structuredContent["error"].startswith("request_hash_mismatch")
    assert shop.calls["ran:score"] == 1  # only the call that was paid for


def test_a_result_that_is_not_the_committed_one_is_refused(chain: Chain, tmp_path: Path) -> None:
    def tamper(result: types.CallToolResult) -> types.CallToolResult:
        if result.isError or not result.content:
            return result
        changed = types.TextContent(type="text", text=_text(result).replace("7", "8"))
        return result.model_copy(update={"content": [changed]})

    async def run(url: str) -> None:
        async with mcp_session(url) as session, _client(session, chain, tmp_path / "buyer.sqlite") as tools:
            # Raised inside the session: leaving it, the MCP client's task group would wrap it in a group.
            with pytest.raises(DeliveryMismatch) as caught:
                await tools.call_tool("score", {"item": "abc"})
        assert caught.value.received != caught.value.committed

    with tool_shop(chain, tmp_path / "seller.sqlite", tamper=tamper) as shop:
        asyncio.run(run(shop.url))
    from escrow_py.buyer import Journal

    journal = Journal(tmp_path / "buyer.sqlite")
    (entry,) = journal.entries()
    journal.close()
    assert entry.state is PaymentState.MISMATCH


def test_a_failing_tool_is_refunded_at_once(chain: Chain, shop: ToolShop, tmp_path: Path) -> None:
    buyer_before = chain.token.balance_of(address(BUYER))

    async def run() -> bytes:
        async with mcp_session(shop.url) as session, _client(session, chain, tmp_path / "buyer.sqlite") as tools:
            with pytest.raises(HandlerFailedRefunded) as caught:
                await tools.call_tool("fail", {"item": "abc"})
        assert caught.value.escrow_id is not None
        return caught.value.escrow_id

    escrow_id = asyncio.run(run())
    assert chain.escrow.state_of(escrow_id) == State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == buyer_before


def _agent(shop: ToolShop, chain: Chain, journal: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(BUYER)}
    args = [sys.executable, str(AGENT), shop.url, "slow", "crash", str(journal), chain.node.url]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recover(shop: ToolShop, chain: Chain, journal_path: Path) -> RecoveryReport:
    """recover() in a new session of a new client on the dead agent's journal."""

    async def recover() -> RecoveryReport:
        async with mcp_session(shop.url) as session, _client(session, chain, journal_path) as tools:
            return await tools.recover()

    return asyncio.run(recover())


def _killed_after_deposit(shop: ToolShop, chain: Chain, journal_path: Path) -> bytes:
    """Start an agent on the slow tool, SIGKILL it once its payment is deposited; the escrow id."""
    from escrow_py.buyer import Journal

    agent = _agent(shop, chain, journal_path)
    try:

        def deposited() -> bytes | None:
            assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
            if not journal_path.exists():
                return None
            journal = Journal(journal_path, audit=False)
            try:
                entries = journal.entries()
            finally:
                journal.close()
            if entries and chain.escrow.state_of(entries[0].escrow_id) == State.HELD:
                return entries[0].escrow_id
            return None

        escrow_id: bytes = until("the agent's deposit", deposited)
        until("the tool running", lambda: shop.calls.get("ran:slow") == 1)  # the agent waits for it
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.communicate(timeout=30)
    return escrow_id


def test_an_agent_killed_mid_call_gets_its_result_from_recover(chain: Chain, shop: ToolShop, tmp_path: Path) -> None:
    journal_path = tmp_path / "buyer.sqlite"
    escrow_id = _killed_after_deposit(shop, chain, journal_path)
    shop.gate.set()  # the tool finishes with nobody listening; the seller stores and delivers it
    until("the stored result", lambda: (p := shop.paid.seller.store.payment(escrow_id)) and p.response)

    item = _recover(shop, chain, journal_path).by_id(escrow_id)
    assert item.action is RecoveryAction.REPLAYED
    assert item.journal_state is PaymentState.DELIVERED
    assert item.body == b"slow result for crash"
    assert shop.calls["ran:slow"] == 1  # replayed from the store, not run again


def test_an_agent_killed_mid_call_whose_tool_never_answers_is_refunded_by_recover(
    chain: Chain, shop: ToolShop, tmp_path: Path
) -> None:
    journal_path = tmp_path / "buyer.sqlite"
    buyer_before = chain.token.balance_of(address(BUYER))
    escrow_id = _killed_after_deposit(shop, chain, journal_path)
    chain.mine(chain.now() + SLOW_TIMEOUT + 5)  # the tool still hangs; the deadline passes

    item = _recover(shop, chain, journal_path).by_id(escrow_id)
    assert item.action is RecoveryAction.REFUNDED
    assert item.journal_state is PaymentState.REFUNDED
    assert chain.escrow.state_of(escrow_id) == State.REFUNDED
    assert chain.token.balance_of(address(BUYER)) == buyer_before


@pytest.mark.parametrize("payment", ["garbage", {"x402Version": 2}, [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]], 10**80])
def test_a_payment_that_does_not_decode_gets_a_reason_and_runs_nothing(shop: ToolShop, payment: object) -> None:
    async def call() -> types.CallToolResult:
        async with mcp_session(shop.url) as session:
            return await session.call_tool("score", {"item": "abc"}, meta={"x402/payment": payment})

    result = asyncio.run(call())
    assert result.isError
    required = result.structuredContent
    assert required is not None and required["accepts"][0]["scheme"] == "delivery-escrow"
    assert required["error"].startswith("invalid_payload"), required["error"]
    assert "ran:score" not in shop.calls
