"""What one paid request costs the seller, hold and serve-first: JSON-RPC calls and SQLite transactions, pinned.

The counts are measured through the real stack (the ASGI app, the middleware, anvil behind the
fault-injecting proxy used here only to count, SQLite traced on its connection), on the second paid
request of a fresh app, so one-off start-up reads are not counted. A change that adds a chain round
trip or a database transaction to the hot path fails here and must say why.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from rpc_proxy import RpcProxy

import escrow_py
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.wire import (
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SettlementExtra,
    SettlementMode,
    SettlementStatus,
    decode_payment_response,
)
from escrow_py.seller import PricedRoute, _machine, _verify

from .payer import quote, sign_payment
from .shop import PRICE, make_shop

# What one paid GET /report/{item} costs (hold mode, deposit confirmed before the handler runs): 9 calls
# (12 before the payment state machine: the fees no longer read a block of their own, the receipt is read once,
# and a receipt is its own first confirmation). Lower these numbers when a change removes a call; never raise
# them without a reason.
RPC_CALLS = {
    "eth_call": 3,  # stateOf(id), the buyer's balance, its authorization's state
    "eth_getBlockByNumber": 1,  # the pending block: the chain's clock and the base fee the deposit pays
    "eth_estimateGas": 1,  # the deposit's simulation, which is also its gas limit
    "eth_maxPriorityFeePerGas": 1,
    "eth_getTransactionCount": 1,  # the operator's pending nonce, under the store's nonce book
    "eth_sendRawTransaction": 1,  # the deposit
    "eth_getTransactionReceipt": 1,  # the deposit mined: one confirmation (polls before it was mined not counted)
}
# The payment's claim taken (a lease row: one replica at a time), the payment recorded, the key's nonce allocated
# (its row in the store, shared by every process), the signed deposit kept in the key's transaction log before
# broadcast (under the deposit's intent, which is how a retry finds it: the payment's row is not written for it),
# and the response stored with its delivery queued, the deposit's hash and the claim's release in that same
# transaction. 8 before the state machine: the sent deposit was also written on the payment's row, and its
# confirmation and the claim's release each took a transaction of their own. No change is acknowledged to anyone
# before the response is stored, and the signed deposit is durable before it leaves, as before.
SQLITE_TRANSACTIONS = 5

# One paid serve-first request: the chain read as a hold payment's is before its deposit, and no transaction.
SERVE_FIRST_RPC_CALLS = {
    "eth_call": 3,  # stateOf(id), the buyer's balance, its authorization's state
    "eth_getBlockByNumber": 1,  # the chain's clock
    "eth_estimateGas": 1,  # the settlement's simulation (the pull the poster's settleMany will make)
}
# The claim taken; the exposure reserved and the payment recorded (one transaction); the response stored with
# its settlement queued and the claim released (one transaction). 4 before: the claim's release was its own.
SERVE_FIRST_SQLITE_TRANSACTIONS = 3


# Calls from the ASGI adapter (seller/_middleware.py) into other escrow_py modules during one paid hold request:
# 33 into 9 modules before the payment state machine (the header decoded in three places, the offer built from six
# calls, the answer's hash and header built in place), 16 into 7 with the machine: route_for, paid_request (_offers),
# parse_payment, facts_needed, decide, kept, header (_machine), rpc.both, read_onchain, judge_onchain, chain.deposit,
# and the store's five (answered, take_lease, payment, begin_deposit, save_served). 19 into 8 now the claim is the
# process's heartbeat's (_claims): take (instead of the store's take_lease), confirm before the handler (no statement
# while the claim is fresh), hand_over to the save that releases it, drop when the request ends.
ADAPTER_TRIPS = 19
_ADAPTER = "seller/_middleware.py"


class SqliteTrace:
    """Counts the transactions of every SQLite connection opened while it is installed."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.early_receipt_polls = 0
        self.header_decodes = 0

    def connect(self, real: Any) -> Any:
        def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn: sqlite3.Connection = real(*args, **kwargs)
            conn.set_trace_callback(self.statements.append)
            return conn

        return traced

    def transactions(self) -> int:
        """Explicit BEGIN ... COMMIT blocks plus the writes run on their own in autocommit mode."""
        count, inside = 0, False
        for statement in self.statements:
            word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
            if word == "BEGIN":
                count, inside = count + 1, True
            elif word in ("COMMIT", "ROLLBACK", "END"):
                inside = False
            elif not inside and word in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
                count += 1
        return count


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[SqliteTrace]:
    tracer = SqliteTrace()
    monkeypatch.setattr(sqlite3, "connect", tracer.connect(sqlite3.connect))
    # anvil's automine mines just after eth_sendRawTransaction answers: on a loaded machine the first receipt
    # poll can come too early. Such polls (receipt None) are counted apart, so the pin holds under load.
    real = TxSender.receipt

    def receipt(self: TxSender, tx_hash: bytes) -> Any:
        found = real(self, tx_hash)
        if found is None:
            tracer.early_receipt_polls += 1
        return found

    monkeypatch.setattr(TxSender, "receipt", receipt)
    # Every place of the seller that could decode PAYMENT-SIGNATURE, counted (each imported the decoder's name).
    for module in (_machine, _verify):
        decode = module.decode_payment_signature

        def counted(value: str, decode: Any = decode) -> Any:
            tracer.header_decodes += 1
            return decode(value)

        monkeypatch.setattr(module, "decode_payment_signature", counted)
    yield tracer


def _trips(trips: Counter[str]) -> Any:
    """A profiler counting calls whose caller is the adapter and whose callee is another escrow_py module."""
    root = str(Path(escrow_py.__file__).parent) + os.sep

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        callee, caller = frame.f_code.co_filename, frame.f_back.f_code.co_filename
        if caller.startswith(root) and callee.startswith(root):
            source, target = caller[len(root) :], callee[len(root) :]
            if source == _ADAPTER and target != _ADAPTER:
                trips[f"{target}:{frame.f_code.co_name}"] += 1

    return profile


def _costs(
    chain: Chain, tmp_path: Path, trace: SqliteTrace, trips: Counter[str] | None = None, **settings: Any
) -> tuple[dict[str, int], int, Any]:
    """The JSON-RPC calls and SQLite transactions of the second paid GET /report/{item} of a fresh shop."""
    chain.mine()
    with RpcProxy(chain.node.url) as proxy:
        shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url, **settings)

        async def pay(item: str) -> tuple[Counter[str], int, httpx.Response]:
            async with shop.client() as client:
                payment = sign_payment(chain, await quote(client, "GET", f"/report/{item}"))
                calls_before, statements_before = Counter(proxy.calls), len(trace.statements)
                early_before = trace.early_receipt_polls
                profile = _trips(trips) if trips is not None and item == "counted" else None
                sys.setprofile(profile)
                threading.setprofile(profile)
                try:
                    response = await client.get(f"/report/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                finally:
                    sys.setprofile(None)
                    threading.setprofile(None)
                assert response.status_code == 200, response.text
                calls = Counter(proxy.calls)
                calls.subtract(calls_before)
                calls["eth_getTransactionReceipt"] -= trace.early_receipt_polls - early_before
                tail = SqliteTrace()
                tail.statements = trace.statements[statements_before:]
                return +calls, tail.transactions(), response

        asyncio.run(pay("warm-up"))  # the first request also reads what the app caches (chain id, domain, ...)
        calls, transactions, response = asyncio.run(pay("counted"))
    assert shop.calls == {"report": 2}
    return dict(calls), transactions, response


def test_one_paid_request_makes_the_pinned_rpc_calls_and_sqlite_transactions(
    chain: Chain, tmp_path: Path, trace: SqliteTrace
) -> None:
    trips: Counter[str] = Counter()
    calls, transactions, _ = _costs(chain, tmp_path, trace, trips)
    # The header decoded once per request (three times before): the quotes' 402s decode nothing.
    assert trace.header_decodes == 2  # the warm-up request and the counted one
    print(f"one paid request: {sum(calls.values())} JSON-RPC calls {calls}, {transactions} SQLite transactions")
    print(f"{sum(trips.values())} trips from the adapter: {dict(trips)}")
    assert calls == RPC_CALLS
    assert transactions == SQLITE_TRANSACTIONS
    assert sum(trips.values()) <= ADAPTER_TRIPS, dict(trips)
    assert trips["seller/_machine.py:decide"] == 1 and trips["seller/_machine.py:parse_payment"] == 1


def test_one_serve_first_request_makes_the_pinned_rpc_calls_and_sqlite_transactions(
    chain: Chain, tmp_path: Path, trace: SqliteTrace
) -> None:
    routes = [PricedRoute("GET", "/report/{item}", amount=PRICE, settlement=SettlementMode.SERVE_FIRST)]
    calls, transactions, response = _costs(
        chain,
        tmp_path,
        trace,
        routes=routes,
        serve_first_max_price=PRICE,
        serve_first_max_per_buyer=10 * PRICE,
        serve_first_max_total=10 * PRICE,
        poster_interval=3600.0,
    )
    print(f"one serve-first request: {sum(calls.values())} JSON-RPC calls {calls}, {transactions} SQLite transactions")
    settle = decode_payment_response(response.headers[PAYMENT_RESPONSE_HEADER])
    assert SettlementExtra.from_json(settle.extra).settlement is SettlementStatus.PENDING  # answered unsettled
    assert calls == SERVE_FIRST_RPC_CALLS
    assert transactions == SERVE_FIRST_SQLITE_TRANSACTIONS
