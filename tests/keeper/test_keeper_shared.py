"""Several keepers at once: on one database, racing each other, with each other's transactions pending.

Refund attempts belong to the signer that made them: a keeper never follows up, replaces or
waits on another signer's transaction. What another keeper's pending transaction covers is
found from the chain itself (a simulation against the pending state just before sending), so
racing stays safe and cheap. And each keeper counts the refunds its own receipts record.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fixtures.chain import Chain
from helpers import BUYER, BUYER2, deposit, dev, make_terms
from prometheus_client import generate_latest
from rpc_proxy import RpcProxy

from escrow_py.chain.escrow import Refunded
from escrow_py.keeper import CycleReport, Keeper
from escrow_py.keeper._batch import batch_gas, ordered, refund_many_data
from escrow_py.protocol.terms import State

from .kit import KEEPER, KEEPER2, KEEPER3, make_keeper, metric, mined, refunds_by_id, transactions_of, wait_until


def _automine(chain: Chain, on: bool) -> None:
    chain.w3.provider.make_request("evm_setAutomine", [on])  # type: ignore[arg-type]


def test_two_keepers_on_one_database_never_touch_each_others_transactions(chain: Chain, tmp_path: Path) -> None:
    batch = [make_terms(chain, window=60, buyer=BUYER if i % 2 else BUYER2) for i in range(4)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    db = tmp_path / "shared.sqlite"
    first = make_keeper(chain, db, who=KEEPER, reorg_depth=0)
    second = make_keeper(chain, db, who=KEEPER2, replace_after=0, reorg_depth=0)
    _automine(chain, False)
    try:
        assert first.run_once().refunds_sent == 4  # pending: no block is coming
        [mine] = first.store.tracked_attempts(dev(KEEPER).address)
        # The second keeper sees the first one's stuck transaction in the shared store; with replace_after=0
        # it would replace its own at once. It must neither touch it (another key: it could not sign it) nor
        # send the same refunds: the first keeper claimed them, so they are not even simulated.
        reports = [second.run_once() for _ in range(3)]
        assert [(r.replaced, r.refunds_sent, r.covered) for r in reports] == [(0, 0, 0)] * 3
        assert second.store.due(chain.escrow.address, 2**62, set(), claimable_by=dev(KEEPER2).address, now=0) == []
        assert first.store.tracked_attempts(dev(KEEPER).address) == [mine]
        assert second.store.tracked_attempts(dev(KEEPER2).address) == []
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        _automine(chain, True)
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch)
    assert first.run_once().confirmed == 4
    assert second.run_once().confirmed == 0
    assert chain.w3.eth.get_transaction_count(dev(KEEPER2).address) == 0


def test_a_peers_unsent_transaction_does_not_hold_up_the_escrows_it_covers(chain: Chain, tmp_path: Path) -> None:
    """Keeper A recorded a refund and died before broadcasting it: keeper B, on the same database, refunds them."""
    batch = [make_terms(chain, window=60) for _ in range(3)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    db = tmp_path / "shared.sqlite"
    first = make_keeper(chain, db, who=KEEPER, reorg_depth=0)
    first.index()
    due = first.store.open_escrows(chain.escrow.address)
    signed = first.chain.sign(chain.escrow.address, refund_many_data(due), gas=batch_gas(len(due)))
    first.store.record_attempt(chain.escrow.address, first.me, [e.id for e in due], signed)  # ...and crashes
    first.close()

    second = make_keeper(chain, db, who=KEEPER2, reorg_depth=0)
    before = int(chain.w3.eth.block_number) + 1
    report = second.run_once()
    assert report.refunds_sent == 3
    mined(chain, KEEPER2, before, 1)
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch)
    # The first keeper's record is its own: untouched by the second, followed up by the first on restart.
    restarted = make_keeper(chain, db, who=KEEPER, reorg_depth=0)
    start = int(chain.w3.eth.block_number) + 1
    [attempt] = restarted.store.tracked_attempts(dev(KEEPER).address)
    assert attempt.status == "signed"
    restarted.run_once()  # broadcasts exactly the recorded transaction: refundMany skips what is settled
    for _ in range(5):  # then follows it up to final (on a loaded machine its receipt may take a cycle more)
        restarted.run_once()
        if restarted.store.attempt_counts(dev(KEEPER).address) == {"final": 1}:
            break
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    assert refunds_by_id(chain) == {chain.escrow.id_of(t): 1 for t in batch}
    assert restarted.store.attempt_counts(dev(KEEPER).address) == {"final": 1}
    assert len(transactions_of(chain, KEEPER, start)) == 1  # the recorded transaction, never a new one


def test_three_racing_keepers_count_exactly_the_refunds_each_made(chain: Chain, tmp_path: Path) -> None:
    """Each keeper's refunds_confirmed is the number of Refunded logs naming it; together, every escrow once."""
    start = int(chain.w3.eth.block_number)
    batch = [make_terms(chain, window=60, buyer=BUYER if i % 2 else BUYER2) for i in range(30)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    who = (KEEPER, KEEPER2, KEEPER3)
    # Two share a database, the third has its own.
    dbs = {KEEPER: tmp_path / "shared.sqlite", KEEPER2: tmp_path / "shared.sqlite", KEEPER3: tmp_path / "own.sqlite"}
    keepers = [make_keeper(chain, dbs[w], who=w, poll_interval=0.02, batch_size=4, reorg_depth=0) for w in who]
    stop = threading.Event()
    threads = [threading.Thread(target=k.run, args=(stop,), kwargs={"check": False}) for k in keepers]
    for thread in threads:
        thread.start()

    def confirmed(keeper: Keeper) -> float:
        return metric(generate_latest(keeper.metrics.registry).decode(), "x402_keeper_refunds_confirmed_total")

    try:
        wait_until(lambda: sum(refunds_by_id(chain).values()) == 30, "all 30 refunded", 90)
        wait_until(lambda: sum(confirmed(k) for k in keepers) >= 30, "every receipt read", 60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a keeper did not stop within 30 s of being told to"
    assert refunds_by_id(chain) == {chain.escrow.id_of(t): 1 for t in batch}
    callers = [e.caller for e in chain.escrow.events(start, int(chain.w3.eth.block_number)) if isinstance(e, Refunded)]
    for keeper, w in zip(keepers, who, strict=True):
        text = generate_latest(keeper.metrics.registry).decode()
        mine = callers.count(dev(w).address)
        assert confirmed(keeper) == mine, f"keeper {w} counted {confirmed(keeper)}, its receipts say {mine}"
        assert metric(text, "x402_keeper_refunds_sent_total") >= mine
        assert metric(text, 'x402_keeper_cycle_failures_total{kind="internal"}') == 0
        receipts = transactions_of(chain, w, start)
        assert metric(text, "x402_keeper_gas_used_total") == sum(int(r["gasUsed"]) for r in receipts)  # type: ignore[call-overload]
    assert sum(confirmed(k) for k in keepers) == 30


@pytest.mark.parametrize("covered", [40, 30, 0])
def test_act_on_a_stale_view_leaves_out_what_a_pending_transaction_covers_in_a_few_calls(
    chain: Chain, tmp_path: Path, covered: int
) -> None:
    """Only the escrows still Held in the pending state go out; finding them costs a few eth_calls, not one each."""
    batch = [make_terms(chain, window=60, buyer=BUYER if i % 2 else BUYER2) for i in range(40)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    first = make_keeper(chain, tmp_path / "a.sqlite", who=KEEPER)
    proxy = RpcProxy(chain.node.url)
    second = make_keeper(chain, tmp_path / "b.sqlite", who=KEEPER2, rpc_url=proxy.url, batch_size=40)
    second.index()
    first.index()
    _automine(chain, False)
    try:
        # The first keeper's transaction, pending, refunds `covered` of the forty (a run of its send order).
        if covered:
            due = ordered(first.store.open_escrows(chain.escrow.address))[:covered]
            chain.sender(KEEPER).send(chain.escrow.address, refund_many_data(due), gas=batch_gas(covered))
        report = CycleReport()
        proxy.calls.clear()
        second.act(report)
        assert (report.covered, report.refunds_sent) == (covered, 40 - covered)
        # One simulation of the batch, then (if the overlap is partial) a bisection on the refund count.
        assert proxy.calls["eth_call"] <= {40: 1, 30: 12, 0: 1}[covered], proxy.calls
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        _automine(chain, True)
        proxy.close()
    assert refunds_by_id(chain) == {chain.escrow.id_of(t): 1 for t in batch}
    assert all(r["status"] == 1 and r["logs"] for r in transactions_of(chain, KEEPER2))


def test_a_standby_keeper_steps_in_only_for_what_the_active_one_left_after_its_delay(
    chain: Chain, tmp_path: Path
) -> None:
    start = int(chain.w3.eth.block_number)
    # One deadline for all four: the standby delay below is counted to the second.
    deadline = make_terms(chain, window=60).deadline
    mine = [make_terms(chain, deadline=deadline, buyer=BUYER) for _ in range(2)]
    left = [make_terms(chain, deadline=deadline, buyer=BUYER2) for _ in range(2)]  # the active one never gets these
    for terms in mine + left:
        deposit(chain, terms)
    chain.mine(deadline)
    active = make_keeper(chain, tmp_path / "active.sqlite", who=KEEPER, buyers=dev(BUYER).address)
    standby = make_keeper(chain, tmp_path / "standby.sqlite", who=KEEPER2, standby_after=120)
    assert standby.run_once().refunds_sent == 0  # at the deadline: the active keeper's turn
    assert active.run_once().refunds_sent == 2
    chain.mine(deadline + 119)
    assert standby.run_once().refunds_sent == 0
    chain.mine(deadline + 120)
    assert standby.run_once().refunds_sent == 2
    mined(chain, KEEPER2, start, 1)  # one transaction (automine mines it just after the node answers)
    assert refunds_by_id(chain) == {chain.escrow.id_of(t): 1 for t in mine + left}
    [receipt] = transactions_of(chain, KEEPER2, start)  # ...and it refunded the two left
    assert receipt["status"] == 1
