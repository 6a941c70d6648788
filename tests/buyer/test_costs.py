"""What one paid request costs the buyer: its JSON-RPC round trips and its durable writes, pinned.

Measured through the real client (AsyncEscrowClient) against the real serve-first seller on anvil, the
buyer's node behind the fault-injecting proxy used here only to count, SQLite traced on every connection
and the audit trail's fsyncs counted, on the second paid request (the first also reads what the client
caches: chain id, the token's domain, the escrow's code). A change that adds a round trip, a commit or
an fsync to the paying path fails here and must say why.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest
from fixtures.chain import Chain
from helpers import BUYER, dev
from rpc_proxy import RpcProxy
from sqlite_trace import SqliteTrace, install

from escrow_py.buyer import AsyncEscrowClient, PaymentState

from .shop import BASE_URL, make_shop

# The balance and the next block's time, in one batch, before signing.
RPC_CALLS = {"eth_call": 1, "eth_getBlockByNumber": 1}
RPC_ROUND_TRIPS = 1
# Journal: the amount reserved, the authorization signed and the payment recorded in one transaction (before
# the header leaves), then the verdict on the answer. Audit: the decision with the `signed` state in one write,
# then the verdict's state; each write one SQLite transaction and one fsync'd append of the JSONL.
JOURNAL_TRANSACTIONS = 2
AUDIT_TRANSACTIONS = 2
AUDIT_FSYNCS = 2


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> SqliteTrace:
    return install(monkeypatch)


def test_one_serve_first_payment_costs_the_buyer_one_round_trip_and_two_commits(
    chain: Chain, tmp_path: Path, trace: SqliteTrace, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = make_shop(chain, tmp_path, settlement="serve-first", poster_interval=3600.0)
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    journal = tmp_path / "buyer.sqlite"
    with RpcProxy(chain.node.url) as proxy:

        async def pay() -> tuple[Counter[str], int, int, int, int]:
            async with AsyncEscrowClient(
                dev(BUYER), proxy.url, journal, transport=shop.transport(), base_url=BASE_URL
            ) as client:
                assert (await client.get("/report/warm-up")).status_code == 200
                calls_before, trips_before = Counter(proxy.calls), len(proxy.requests)
                statements_before, fsyncs_before = len(trace.statements), len(fsyncs)
                response = await client.get("/report/counted")
                assert response.status_code == 200, response.text
                calls = Counter(proxy.calls)
                calls.subtract(calls_before)
                tail = trace.since(statements_before)
                return (
                    +calls,
                    len(proxy.requests) - trips_before,
                    tail.transactions("buyer.sqlite"),
                    tail.transactions("buyer.audit.sqlite"),
                    len(fsyncs) - fsyncs_before,
                )

        calls, trips, journal_tx, audit_tx, audit_fsyncs = asyncio.run(pay())
    print(f"buyer: {dict(calls)} in {trips} round trips; journal {journal_tx}, audit {audit_tx} transactions, "
          f"{audit_fsyncs} JSONL fsyncs")  # fmt: skip
    assert dict(calls) == RPC_CALLS
    assert trips == RPC_ROUND_TRIPS
    assert journal_tx == JOURNAL_TRANSACTIONS
    assert audit_tx == AUDIT_TRANSACTIONS
    assert audit_fsyncs == AUDIT_FSYNCS
    entries = [e for e in AsyncEscrowClient(dev(BUYER), chain.node.url, journal).journal.entries()]
    assert [e.state for e in entries] == [PaymentState.UNSETTLED, PaymentState.UNSETTLED]
