"""200 concurrent paid requests against a budget that allows exactly 10: exactly 10 are paid, never more.

Three forms: 200 threads sharing one sync client over real HTTP, 200 asyncio tasks
sharing one async client, and a fleet of 4 agent processes sharing one journal (one
SQLite file, or one PostgreSQL database) and so one budget. Afterwards the ledger matches the chain: ten deposits by
the buyer, ten spent rows, nothing reserved, and once the seller's poster has posted
the deliveries the seller holds exactly what the ledger says was spent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev

from escrow_py.buyer import (
    AsyncEscrowClient,
    EscrowClient,
    Journal,
    LedgerStatus,
    PaymentState,
    Policy,
    PolicyDenied,
    Reason,
    recover,
)
from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.terms import State

from .shop import BASE_URL, PRICE, Shop

REQUESTS = 200
AFFORDABLE = 10
POLICY = Policy(total_budget=AFFORDABLE * PRICE)


def _outcome(call: object) -> str:
    return "paid" if isinstance(call, httpx.Response) and call.status_code == 200 else str(call)


def _assert_ledger_matches_the_chain(
    chain: Chain, shop: Shop, journal: Path | str, outcomes: Counter[str], seller_before: int
) -> None:
    assert outcomes == Counter({"paid": AFFORDABLE, Reason.OVER_TOTAL_BUDGET.value: REQUESTS - AFFORDABLE})
    deposits = [
        e
        for e in chain.escrow.events(0, int(chain.w3.eth.block_number))
        if isinstance(e, Deposited) and e.terms.buyer == address(BUYER)
    ]
    assert len(deposits) == AFFORDABLE
    stored = Journal(journal, audit=False)
    try:
        entries = stored.entries()
        assert len(entries) == AFFORDABLE  # the denied ones signed nothing, journaled nothing
        assert all(e.state is PaymentState.DELIVERED for e in entries)
        rows = stored.ledger_rows()
        assert Counter(r.status for r in rows) == Counter({LedgerStatus.SPENT: AFFORDABLE})
        assert {r.escrow_id for r in rows} == {d.id for d in deposits}
        # The seller's poster posts (the uvicorn lifespan's may already have); recover() reconciles the ledger.
        asyncio.run(shop.middleware.poster.flush())
        assert all(chain.escrow.state_of(d.id) is State.RELEASED for d in deposits)
        recover(journal, dev(BUYER), chain.node.url)
        assert stored.unconfirmed() == []
        spent = sum(r.amount for r in stored.ledger_rows() if r.status is LedgerStatus.SPENT)
    finally:
        stored.close()
    assert chain.token.balance_of(address(SELLER)) - seller_before == spent == AFFORDABLE * PRICE


def test_200_threads_against_a_budget_for_10(chain: Chain, shop: Shop, served: str, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    seller_before = chain.token.balance_of(address(SELLER))
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(REQUESTS)
    with EscrowClient(dev(BUYER), chain.node.url, journal, policy=POLICY, timeout=120) as client:

        def buy(i: int) -> None:
            start.wait()
            try:
                result: object = client.get(f"{served}/report/t{i}")
            except PolicyDenied as denied:
                result = denied.code
            except httpx.HTTPError as exc:  # counted, so the assertion shows it
                result = repr(exc)
            with lock:
                outcomes[_outcome(result)] += 1

        threads = [threading.Thread(target=buy, args=(i,)) for i in range(REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
    _assert_ledger_matches_the_chain(chain, shop, journal, outcomes, seller_before)


def test_200_asyncio_tasks_against_a_budget_for_10(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    seller_before = chain.token.balance_of(address(SELLER))

    async def run() -> Counter[str]:
        async with AsyncEscrowClient(
            dev(BUYER), chain.node.url, journal, policy=POLICY, transport=shop.transport(), base_url=BASE_URL
        ) as client:

            async def buy(i: int) -> str:
                try:
                    return _outcome(await client.get(f"/report/a{i}"))
                except PolicyDenied as denied:
                    return denied.code
                except httpx.HTTPError as exc:
                    return repr(exc)

            return Counter(await asyncio.gather(*(buy(i) for i in range(REQUESTS))))

    _assert_ledger_matches_the_chain(chain, shop, journal, asyncio.run(run()), seller_before)


AGENTS = 4


def test_a_fleet_of_agent_processes_on_one_journal_against_a_budget_for_10(
    chain: Chain, shop: Shop, served: str, db_url: str
) -> None:
    """4 processes of 50 threads, one journal URL: the budget holds across processes (and hosts, for PostgreSQL)."""
    seller_before = chain.token.balance_of(address(SELLER))
    Journal(db_url, audit=False).close()  # migrated once up front: the agents start on one schema
    agent = Path(__file__).with_name("fleet_agent.py")
    start = time.time() + 8  # every agent imported and connected: then all 200 go at once
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(agent),
                chain.node.url,
                db_url,
                served,
                f"p{n}-",
                str(REQUESTS // AGENTS),
                str(AFFORDABLE * PRICE),
                str(start),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(AGENTS)
    ]
    outcomes: Counter[str] = Counter()
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        outcomes.update(json.loads(out.strip().splitlines()[-1]))
    _assert_ledger_matches_the_chain(chain, shop, db_url, outcomes, seller_before)
