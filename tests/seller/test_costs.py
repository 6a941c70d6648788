"""What one paid request costs the seller, in hold mode and serve-first: JSON-RPC calls, the round
trips they take (HTTP requests to the node: a JSON-RPC batch is one) and SQLite transactions, pinned.

The counts are measured through the real stack (the ASGI app, the middleware, anvil behind the
fault-injecting proxy used here only to count, SQLite traced on its connection), on the second paid
request of a fresh app, so one-off start-up reads are not counted. A change that adds a chain round
trip or a database transaction to the hot path fails here and must say why.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fixtures.chain import Chain
from rpc_proxy import RpcProxy
from sqlite_trace import SqliteTrace, install

from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER
from escrow_py.seller import PricedRoute

from .payer import quote, sign_payment
from .shop import PRICE, make_shop

# What one paid GET /report/{item} costs today (hold mode, deposit confirmed before the handler runs):
# 10 calls. Lower these numbers when a change removes a call; never raise them without a reason.
RPC_CALLS = {
    "eth_call": 3,  # stateOf(id), the buyer's balance, the deposit's simulation
    "eth_getBlockByNumber": 2,  # the chain's clock (the pending block), then the base fee for the deposit
    "eth_estimateGas": 1,
    "eth_maxPriorityFeePerGas": 1,
    "eth_getTransactionCount": 1,  # the operator's nonce, read again for every deposit
    "eth_sendRawTransaction": 1,  # the deposit
    "eth_getTransactionReceipt": 1,  # polled until the deposit is mined (one confirmation: no look at the head)
}
# The payment recorded, the deposit transaction recorded before it is sent, the deposit recorded as held, the
# response stored with its delivery queued (reads outside a transaction before them); and, so that several
# processes and replicas can share the store and the operator key: the payment's claim taken and released
# (a lease row, one replica at a time), the key's nonce allocated (its row in the store, not a process's
# counter), the signed deposit kept in the key's transaction log before broadcast.
SQLITE_TRANSACTIONS = 4 + 2 + 1 + 1
# One batch before the deposit (the escrow's state, the clock, the balance, the authorization's state and the
# deposit's simulation; judged after the off-chain checks had that clock), one for the fees with the operator's
# nonce, then the deposit itself and its receipt.
RPC_ROUND_TRIPS = 1 + 1 + 1 + 1

# Serve-first: every read of the payment in one batch before the handler runs (the escrow's state, the clock, the
# buyer's balance, the authorization's state, the settlement's simulation), no transaction on the request's path.
SERVE_FIRST_RPC_CALLS = {"eth_call": 3, "eth_getBlockByNumber": 1, "eth_estimateGas": 1}
SERVE_FIRST_RPC_ROUND_TRIPS = 1
# The claim taken and released, the exposure reserved with the payment recorded, the response stored with its
# settlement queued.
SERVE_FIRST_SQLITE_TRANSACTIONS = 2 + 1 + 1


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> SqliteTrace:
    return install(monkeypatch)


def _costs(chain: Chain, tmp_path: Path, trace: SqliteTrace, **settings: Any) -> tuple[Counter[str], int, int, Any]:
    """(JSON-RPC calls, round trips, SQLite transactions) of the second paid GET /report/{item}, and the shop."""
    chain.mine()
    with RpcProxy(chain.node.url) as proxy:
        shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url, **settings)

        async def pay(item: str) -> tuple[Counter[str], int, int]:
            async with shop.client() as client:
                payment = sign_payment(chain, await quote(client, "GET", f"/report/{item}"))
                calls_before, trips_before = Counter(proxy.calls), len(proxy.requests)
                statements_before = len(trace.statements)
                response = await client.get(f"/report/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                assert response.status_code == 200, response.text
                calls = Counter(proxy.calls)
                calls.subtract(calls_before)
                tail = trace.since(statements_before)
                return +calls, len(proxy.requests) - trips_before, tail.transactions()

        asyncio.run(pay("warm-up"))  # the first request also reads what the app caches (chain id, domain, ...)
        calls, trips, transactions = asyncio.run(pay("counted"))
    print(f"one paid request: {sum(calls.values())} JSON-RPC calls {dict(calls)} in {trips} round trips, "
          f"{transactions} SQLite transactions")  # fmt: skip
    return calls, trips, transactions, shop


def test_one_paid_request_makes_the_pinned_rpc_calls_and_sqlite_transactions(
    chain: Chain, tmp_path: Path, trace: SqliteTrace
) -> None:
    calls, trips, transactions, shop = _costs(chain, tmp_path, trace)
    assert dict(calls) == RPC_CALLS
    assert trips == RPC_ROUND_TRIPS
    assert transactions == SQLITE_TRANSACTIONS
    assert shop.calls == {"report": 2}


def test_one_serve_first_request_reads_the_chain_in_one_round_trip(
    chain: Chain, tmp_path: Path, trace: SqliteTrace
) -> None:
    route = PricedRoute("GET", "/report/{item}", amount=PRICE, settlement="serve-first")
    limits = {
        "serve_first_max_price": PRICE,
        "serve_first_max_per_buyer": PRICE * 10,
        "serve_first_max_total": PRICE * 10,
    }
    calls, trips, transactions, shop = _costs(chain, tmp_path, trace, routes=[route], poster_interval=3600.0, **limits)
    assert dict(calls) == SERVE_FIRST_RPC_CALLS
    assert trips == SERVE_FIRST_RPC_ROUND_TRIPS
    assert transactions == SERVE_FIRST_SQLITE_TRANSACTIONS
    assert shop.calls == {"report": 2}
