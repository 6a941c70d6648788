"""What one paid request costs the seller, hold and serve-first: JSON-RPC calls, the round trips they take
(HTTP requests to the node: a JSON-RPC batch is one), SQLite transactions and the adapter's calls, pinned.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from rpc_proxy import RpcProxy
from sqlite_trace import SqliteTrace

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

# What one paid GET /report/{item} costs (hold mode, deposit confirmed before the handler runs): 9 calls in 4
# round trips (12 calls before the payment state machine: the fees no longer read a block of their own, the
# receipt is read once, and a receipt is its own first confirmation). Lower these numbers when a change removes a
# call; never raise them without a reason.
RPC_CALLS = {
    "eth_call": 3,  # stateOf(id), the buyer's balance, its authorization's state
    "eth_getBlockByNumber": 1,  # the pending block: the chain's clock and the base fee the deposit pays
    "eth_estimateGas": 1,  # the deposit's simulation, which is also its gas limit
    "eth_maxPriorityFeePerGas": 1,
    "eth_getTransactionCount": 1,  # the operator's pending nonce, under the store's nonce book
    "eth_sendRawTransaction": 1,  # the deposit
    "eth_getTransactionReceipt": 1,  # the deposit mined: one confirmation (polls before it was mined not counted)
}
# One batch before the deposit (the escrow's state, the clock, the balance, the authorization's state and the
# deposit's simulation; judged after the off-chain checks had that clock), one for the tip with the operator's
# nonce (the base fee is the pending block's, read with the clock), then the deposit itself and its receipt.
RPC_ROUND_TRIPS = 1 + 1 + 1 + 1
# The payment's claim taken (a lease row: one replica at a time), the payment recorded, the key's nonce allocated
# (its row in the store, shared by every process), the signed deposit kept in the key's transaction log before
# broadcast (under the deposit's intent, which is how a retry finds it: the payment's row is not written for it),
# and the response stored with its delivery queued, the deposit's hash and the claim's release in that same
# transaction. 8 before the state machine: the sent deposit was also written on the payment's row, and its
# confirmation and the claim's release each took a transaction of their own. No change is acknowledged to anyone
# before the response is stored, and the signed deposit is durable before it leaves, as before.
SQLITE_TRANSACTIONS = 5

# One paid serve-first request: the chain read as a hold payment's is before its deposit, and no transaction:
# every read in one batch before the handler runs.
SERVE_FIRST_RPC_CALLS = {
    # stateOf(id), the buyer's balance, its authorization's state, and the settlement's simulation (the pull the
    # poster's settleMany will make) by eth_call: no gas is estimated for a settlement sent later in a batch that
    # estimates its own (an eth_estimateGas before, several executions of the call on the node instead of one).
    "eth_call": 4,
    "eth_getBlockByNumber": 1,  # the chain's clock
}
SERVE_FIRST_RPC_ROUND_TRIPS = 1
# The claim taken; the exposure reserved and the payment recorded (one transaction); the response stored with
# its settlement queued and the claim released (one transaction). 4 before: the claim's release was its own.
SERVE_FIRST_SQLITE_TRANSACTIONS = 3


# Calls from the ASGI adapter (seller/_middleware.py) into other escrow_py modules during one paid hold request:
# 33 into 9 modules before the payment state machine (the header decoded in three places, the offer built from six
# calls, the answer's hash and header built in place), 17 into 6 with the machine and the batched chain look:
# route_for, paid_request, the route's serve_first (_config, _offers: it picks what the first look at the chain
# simulates), parse_payment, facts_needed, decide, kept, header (_machine), chain.look and chain.deposit (the port),
# onchain_from_look and judge_onchain (_verify), and the store's five (answered, take_lease, payment, begin_deposit,
# save_served). 20 into 7 now the claim is the process's heartbeat's (_claims): take (instead of the store's
# take_lease), confirm before the handler (no statement while the claim is fresh), hand_over to the save that
# releases it, drop when the request ends.
ADAPTER_TRIPS = 20
# The adapter is the middleware and the ASGI plumbing split out of it for reading (seller/_asgi.py: routing, the
# body, the handler's capture, sending): a call between the two is not a trip into another module, and the
# plumbing's own calls out (route_for) are counted as the adapter's, as they were before the split.
_ADAPTER = frozenset({"seller/_middleware.py", "seller/_asgi.py"})


class Trace(SqliteTrace):
    """SQLite's transactions, and what else a request is counted by: receipt polls made before the deposit was
    mined, and decodings of PAYMENT-SIGNATURE."""

    def __init__(self) -> None:
        super().__init__()
        self.early_receipt_polls = 0
        self.header_decodes = 0


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trace]:
    tracer = Trace()
    monkeypatch.setattr(sqlite3, "connect", tracer.connect(sqlite3.connect))
    # anvil's automine mines just after eth_sendRawTransaction answers: on a loaded machine the first receipt
    # poll can come too early. Such polls (receipt None) are counted apart, so the pins hold under load.
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
            if source in _ADAPTER and target not in _ADAPTER:
                trips[f"{target}:{frame.f_code.co_name}"] += 1

    return profile


@dataclass
class Costs:
    """What the second paid GET /report/{item} of a fresh shop cost."""

    calls: dict[str, int]  # JSON-RPC calls by method
    round_trips: int  # HTTP requests to the node (a batch is one)
    transactions: int  # SQLite transactions
    response: httpx.Response


def _costs(chain: Chain, tmp_path: Path, trace: Trace, trips: Counter[str] | None = None, **settings: Any) -> Costs:
    """The JSON-RPC calls, round trips and SQLite transactions of the second paid GET /report/{item} of a fresh shop."""
    chain.mine()
    with RpcProxy(chain.node.url) as proxy:
        shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url, **settings)

        async def pay(item: str) -> Costs:
            async with shop.client() as client:
                payment = sign_payment(chain, await quote(client, "GET", f"/report/{item}"))
                calls_before, trips_before = Counter(proxy.calls), len(proxy.requests)
                statements_before, early_before = len(trace.statements), trace.early_receipt_polls
                profile = _trips(trips) if trips is not None and item == "counted" else None
                sys.setprofile(profile)
                threading.setprofile(profile)
                try:
                    response = await client.get(f"/report/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                finally:
                    sys.setprofile(None)
                    threading.setprofile(None)
                assert response.status_code == 200, response.text
                early = trace.early_receipt_polls - early_before  # each its own request, of one call
                calls = Counter(proxy.calls)
                calls.subtract(calls_before)
                calls["eth_getTransactionReceipt"] -= early
                round_trips = len(proxy.requests) - trips_before - early
                return Costs(dict(+calls), round_trips, trace.since(statements_before).transactions(), response)

        asyncio.run(pay("warm-up"))  # the first request also reads what the app caches (chain id, domain, ...)
        costs = asyncio.run(pay("counted"))
    assert shop.calls == {"report": 2}
    return costs


def test_one_paid_request_makes_the_pinned_rpc_calls_and_sqlite_transactions(
    chain: Chain, tmp_path: Path, trace: Trace
) -> None:
    trips: Counter[str] = Counter()
    costs = _costs(chain, tmp_path, trace, trips)
    # The header decoded once per request (three times before): the quotes' 402s decode nothing.
    assert trace.header_decodes == 2  # the warm-up request and the counted one
    print(
        f"one paid request: {sum(costs.calls.values())} JSON-RPC calls {costs.calls} in {costs.round_trips} "
        f"round trips, {costs.transactions} SQLite transactions"
    )
    print(f"{sum(trips.values())} trips from the adapter: {dict(trips)}")
    assert costs.calls == RPC_CALLS
    assert costs.round_trips == RPC_ROUND_TRIPS
    assert costs.transactions == SQLITE_TRANSACTIONS
    assert sum(trips.values()) <= ADAPTER_TRIPS, dict(trips)
    assert trips["seller/_machine.py:decide"] == 1 and trips["seller/_machine.py:parse_payment"] == 1


def test_one_serve_first_request_reads_the_chain_in_one_round_trip(chain: Chain, tmp_path: Path, trace: Trace) -> None:
    routes = [PricedRoute("GET", "/report/{item}", amount=PRICE, settlement=SettlementMode.SERVE_FIRST)]
    costs = _costs(
        chain,
        tmp_path,
        trace,
        routes=routes,
        serve_first_max_price=PRICE,
        serve_first_max_per_buyer=10 * PRICE,
        serve_first_max_total=10 * PRICE,
        poster_interval=3600.0,
    )
    print(
        f"one serve-first request: {sum(costs.calls.values())} JSON-RPC calls {costs.calls} in "
        f"{costs.round_trips} round trips, {costs.transactions} SQLite transactions"
    )
    settle = decode_payment_response(costs.response.headers[PAYMENT_RESPONSE_HEADER])
    assert SettlementExtra.from_json(settle.extra).settlement is SettlementStatus.PENDING  # answered unsettled
    assert costs.calls == SERVE_FIRST_RPC_CALLS
    assert costs.round_trips == SERVE_FIRST_RPC_ROUND_TRIPS
    assert costs.transactions == SERVE_FIRST_SQLITE_TRANSACTIONS
