"""What one paid hold-mode request costs the seller: JSON-RPC calls and SQLite transactions, pinned.

The counts are measured through the real stack (the ASGI app, the middleware, anvil behind the
fault-injecting proxy used here only to count, SQLite traced on its connection), on the second paid
request of a fresh app, so one-off start-up reads are not counted. A change that adds a chain round
trip or a database transaction to the hot path fails here and must say why.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.chain import Chain
from rpc_proxy import RpcProxy

from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

from .payer import quote, sign_payment
from .shop import make_shop

# What one paid GET /report/{item} costs today (hold mode, deposit confirmed before the handler runs):
# 12 calls, in this order. Lower these numbers when a change removes a call; never raise them without a reason.
RPC_CALLS = {
    "eth_call": 3,  # stateOf(id), the buyer's balance, the deposit's simulation
    "eth_getBlockByNumber": 2,  # the chain's clock (the pending block), then the base fee for the deposit
    "eth_estimateGas": 1,
    "eth_maxPriorityFeePerGas": 1,
    "eth_getTransactionCount": 1,  # the operator's nonce, read again for every deposit
    "eth_sendRawTransaction": 1,  # the deposit
    "eth_getTransactionReceipt": 2,  # polled until the deposit is mined
    "eth_blockNumber": 1,  # its confirmation depth
}
# The payment recorded, the deposit transaction recorded before it is sent, the deposit recorded as held, the
# response stored with its delivery queued (reads outside a transaction before them); and, so that several
# processes and replicas can share the store and the operator key: the payment's claim taken and released
# (a lease row, one replica at a time), the key's nonce allocated (its row in the store, not a process's
# counter), the signed deposit kept in the key's transaction log before broadcast.
SQLITE_TRANSACTIONS = 4 + 2 + 1 + 1


class SqliteTrace:
    """Counts the transactions of every SQLite connection opened while it is installed."""

    def __init__(self) -> None:
        self.statements: list[str] = []

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
    yield tracer


def test_one_paid_request_makes_the_pinned_rpc_calls_and_sqlite_transactions(
    chain: Chain, tmp_path: Path, trace: SqliteTrace
) -> None:
    chain.mine()
    with RpcProxy(chain.node.url) as proxy:
        shop = make_shop(chain, tmp_path / "seller.sqlite", rpc_url=proxy.url)

        async def pay(item: str) -> tuple[Counter[str], int]:
            async with shop.client() as client:
                payment = sign_payment(chain, await quote(client, "GET", f"/report/{item}"))
                calls_before, statements_before = Counter(proxy.calls), len(trace.statements)
                response = await client.get(f"/report/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
                assert response.status_code == 200, response.text
                calls = Counter(proxy.calls)
                calls.subtract(calls_before)
                tail = SqliteTrace()
                tail.statements = trace.statements[statements_before:]
                return +calls, tail.transactions()

        asyncio.run(pay("warm-up"))  # the first request also reads what the app caches (chain id, domain, ...)
        calls, transactions = asyncio.run(pay("counted"))
    print(f"one paid request: {sum(calls.values())} JSON-RPC calls {dict(calls)}, {transactions} SQLite transactions")
    assert dict(calls) == RPC_CALLS
    assert transactions == SQLITE_TRANSACTIONS
    assert shop.calls == {"report": 2}
