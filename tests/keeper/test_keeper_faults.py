"""The keeper under faults: SIGKILL at random moments, an RPC that drops, fails or refuses requests.

The faults come from a loopback JSON-RPC proxy in front of the real anvil (tests/rpc_proxy.py);
the keeper is a real process (or a real Keeper in a thread) on a real chain.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.chain import Chain
from helpers import deposit, make_terms
from prometheus_client import generate_latest
from rpc_proxy import INTERNAL_ERROR, RpcProxy

from escrow_devtools.anvil import free_port
from escrow_py.protocol.errors import RpcError, RpcTimeout
from escrow_py.protocol.terms import State, Terms

from .kit import KEEPER, make_keeper, metric, readyz, refunds_by_id, scrape, start_keeper, transactions_of, wait_until

TRIALS = 20


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_refund_and_sends_none_twice(chain: Chain, tmp_path: Path) -> None:
    rng = random.Random(402)
    db = tmp_path / "keeper.sqlite"
    expired: list[Terms] = []
    unexpired: list[Terms] = []
    args = ("--poll-interval", "0.1", "--batch-size", "2")
    for trial in range(TRIALS):
        soon = [make_terms(chain, window=50) for _ in range(3)]
        later = make_terms(chain, window=100_000)
        for terms in [*soon, later]:
            deposit(chain, terms)
        expired += soon
        unexpired.append(later)
        chain.mine(soon[-1].deadline)
        keeper = start_keeper(chain, db, *args)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: importing, indexing, signing, recording, broadcasting
        keeper.send_signal(signal.SIGKILL)
        keeper.wait()
        # A restarted keeper finishes the job (every few trials, after a second kill).
        if trial % 4 == 3:
            keeper = start_keeper(chain, db, *args)
            time.sleep(rng.uniform(0.0, 1.0))
            keeper.send_signal(signal.SIGKILL)
            keeper.wait()
    keeper = start_keeper(chain, db, *args)
    try:
        wait_until(lambda: all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in expired),
                   "expired escrows refunded after the last restart", 90)  # fmt: skip
    finally:
        keeper.send_signal(signal.SIGKILL)
        keeper.wait()
    refunds = refunds_by_id(chain)
    assert all(refunds.get(chain.escrow.id_of(t)) == 1 for t in expired)
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.HELD for t in unexpired)
    assert not any(chain.escrow.id_of(t) in refunds for t in unexpired)
    assert chain.token.balance_of(chain.escrow.address) == sum(t.amount for t in unexpired)


def test_keeper_survives_an_rpc_that_drops_and_fails_requests_and_serves_health(chain: Chain, tmp_path: Path) -> None:
    batch = [make_terms(chain, window=60) for _ in range(4)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    proxy = RpcProxy(chain.node.url)
    port = free_port()
    keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, poll_interval=0.05, reorg_depth=0,
                         metrics=f"127.0.0.1:{port}")  # fmt: skip
    keeper.check()  # before the faults start: the start-up checks need a node that answers
    proxy.drop_rate, proxy.http_error_rate = 0.10, 0.05
    stop = threading.Event()
    thread = threading.Thread(target=keeper.run, args=(stop,), kwargs={"check": False})
    thread.start()
    try:
        wait_until(lambda: all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch),
                   "refunds through the flaky RPC")  # fmt: skip
        # Counted once mined (reorg_depth 0): wait for the cycle that reads the receipts.
        wait_until(lambda: metric(scrape(port), "x402_keeper_refunds_confirmed_total") == 4, "4 confirmed refunds")
        proxy.heal()
        wait_until(lambda: readyz(port) == 200, "ready once the RPC is healthy")
        metrics = scrape(port)
    finally:
        stop.set()
        thread.join(timeout=30)
        proxy.close()
    assert metric(metrics, "x402_keeper_refunds_sent_total") == 4
    assert proxy.faults > 0 and metric(metrics, "x402_keeper_rpc_errors_total") > 0  # faults happened, survived
    assert all(v == 1 for v in refunds_by_id(chain).values())


def test_json_rpc_error_objects_fail_cycles_not_the_process_and_readyz_says_so(chain: Chain, tmp_path: Path) -> None:
    """-32603 on eth_getTransactionCount, then on the head reads: every cycle fails, the process lives on.

    A supervisor restarts the keeper whenever it exits; it must never have to.
    """
    proxy = RpcProxy(chain.node.url)
    port = free_port()
    db = tmp_path / "k.sqlite"
    args = ("--poll-interval", "0.1", "--metrics", f"127.0.0.1:{port}", "--log-json")
    restarts = 0
    procs: list[subprocess.Popen[str]] = []
    stop = threading.Event()

    def supervise() -> None:
        nonlocal restarts
        while not stop.is_set():
            if procs[-1].poll() is not None:
                restarts += 1
                procs.append(start_keeper(chain, db, *args, rpc_url=proxy.url, stderr=subprocess.PIPE))
            stop.wait(0.1)

    procs.append(start_keeper(chain, db, *args, rpc_url=proxy.url, stderr=subprocess.PIPE))
    supervisor = threading.Thread(target=supervise)
    supervisor.start()

    def alive_and(condition: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            assert restarts == 0, f"the keeper died ({restarts} restarts by the supervisor)"
            return condition()

        return check

    try:
        wait_until(alive_and(lambda: _ready(port) == 200), "keeper up", 60)
        # Phase 1: the key's nonce cannot be read, so no refund can be signed, while escrows are due.
        proxy.fail("eth_getTransactionCount", INTERNAL_ERROR)
        batch = [make_terms(chain, window=60) for _ in range(3)]
        for terms in batch:
            deposit(chain, terms)
        chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
        wait_until(alive_and(lambda: _ready(port) == 503), "readyz 503 after repeated failures")
        failures = metric(scrape(port), "x402_keeper_cycle_failures_total")
        assert failures >= 3 and all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.HELD for t in batch)
        proxy.heal()
        wait_until(alive_and(lambda: all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED
                                         for t in batch)), "refunds once the node answers again")  # fmt: skip
        wait_until(alive_and(lambda: _ready(port) == 200), "ready again")
        # Phase 2: the chain head cannot be read at all.
        proxy.fail("eth_blockNumber", INTERNAL_ERROR)
        proxy.fail("eth_getBlockByNumber", INTERNAL_ERROR)
        wait_until(alive_and(lambda: _ready(port) == 503), "readyz 503 while the head cannot be read")
        proxy.heal()
        wait_until(alive_and(lambda: _ready(port) == 200), "ready again after the second outage")
    finally:
        stop.set()
        supervisor.join(timeout=30)
        procs[-1].send_signal(signal.SIGTERM)
        _, stderr = procs[-1].communicate(timeout=30)
        proxy.close()
    assert restarts == 0, f"the keeper died {restarts} times"
    assert procs[-1].returncode == 0
    assert "Traceback" not in stderr
    assert '"msg": "cycle failed (' in stderr and "internal error" in stderr  # logged, with the node's message


def _ready(port: int) -> int:
    try:
        return readyz(port)
    except OSError:
        return 0  # not listening yet


def test_a_batch_the_node_refuses_for_its_size_is_split_not_resent_forever(chain: Chain, tmp_path: Path) -> None:
    """A node that refuses raw transactions over a size (geth: 128 KiB); the keeper halves its batches."""
    start = int(chain.w3.eth.block_number)
    batch = [make_terms(chain, window=60) for _ in range(8)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    proxy = RpcProxy(chain.node.url)
    proxy.refuse_raw_over(1_500)  # 8 entries are about 2.2 kB, 4 about 1.2 kB
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, batch_size=8, reorg_depth=0)
        reports = [keeper.run_once() for _ in range(4)]
    finally:
        proxy.close()
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.REFUNDED for t in batch)
    assert proxy.calls["eth_sendRawTransaction"] == 3  # one refused, then two halves, and nothing re-sent
    assert sum(r.refunds_sent for r in reports) == 8  # the refused batch is not counted as sent
    assert sum(r.confirmed for r in reports) == 8
    assert keeper.store.attempt_counts() == {"rejected": 1, "final": 2}
    metrics = generate_latest(keeper.metrics.registry).decode()
    assert 'x402_keeper_transactions_total{outcome="rejected"} 1.0' in metrics
    assert len(transactions_of(chain, KEEPER, start)) == 2


def test_a_broadcast_that_fails_is_neither_counted_nor_logged_as_sent(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    terms = make_terms(chain, window=60)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    proxy = RpcProxy(chain.node.url)
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, reorg_depth=0)
        proxy.fail("eth_sendRawTransaction", {"code": -32000, "message": "nonce too low"})
        caplog.set_level(logging.INFO, logger="escrow_py.keeper")
        report = keeper.run_once()
        assert report.refunds_sent == 0 and chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
        assert "refund batch sent" not in caplog.text
        assert metric(generate_latest(keeper.metrics.registry).decode(), "x402_keeper_refunds_sent_total") == 0
        proxy.heal()
        reports = [keeper.run_once() for _ in range(3)]
    finally:
        proxy.close()
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
    assert sum(r.refunds_sent for r in reports) == 1 and sum(r.confirmed for r in reports) == 1
    assert metric(generate_latest(keeper.metrics.registry).decode(), "x402_keeper_refunds_sent_total") == 1
    assert caplog.text.count("refund batch sent") == 1


def test_a_node_that_never_answers_fails_a_cycle_within_rpc_timeout(chain: Chain, tmp_path: Path) -> None:
    """The keeper's connection is chain.rpc.connect: one deadline per call, retries included, a typed error."""
    with RpcProxy(chain.node.url) as proxy:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, rpc_timeout=1)
        keeper.run_once()
        proxy.mode = "blackhole"  # accepts the connection, reads the request, never answers
        started = time.monotonic()
        with pytest.raises(RpcTimeout, match=r"no answer from http://127\.0\.0\.1:"):
            keeper.run_once()
        assert time.monotonic() - started < 5  # one deadline, not one per retry
        proxy.mode = "forward"
        keeper.run_once()  # and the next cycle works again


def _one_expired_escrow(chain: Chain) -> bytes:
    """One escrow deposited and past its deadline: due for a keeper's refund."""
    terms = make_terms(chain, window=60)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    return chain.escrow.id_of(terms)


@pytest.mark.parametrize(
    "refusal",
    [
        {"code": -32005, "message": "limit exceeded"},  # a public RPC's rate limit, as an error object
        {"code": -32000, "message": "txpool is full"},  # geth under load
    ],
    ids=["rate-limited", "pool-full"],
)
def test_a_broadcast_the_node_refuses_for_now_is_sent_again_not_quarantined(
    chain: Chain, tmp_path: Path, refusal: dict[str, object]
) -> None:
    """A refusal that says nothing about the transaction (a rate limit, a full pool) is a fault of the moment:
    the same bytes go out again next cycle. Taken for a refusal of what the transaction is, it quarantined the
    lone escrow for good (or halved the batches for the life of the process)."""
    escrow_id = _one_expired_escrow(chain)
    proxy = RpcProxy(chain.node.url)
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, reorg_depth=0)
        proxy.fail("eth_sendRawTransaction", refusal, times=1)
        first = keeper.run_once()
        assert first.quarantined == 0 and chain.escrow.state_of(escrow_id) is State.HELD
        reports = [keeper.run_once() for _ in range(3)]
    finally:
        proxy.close()
    assert chain.escrow.state_of(escrow_id) is State.REFUNDED
    assert keeper.store.troubles(chain.escrow.address, "quarantined") == []
    assert keeper._batch_cap is None  # the batches were not shrunk for a fault of the node
    assert sum(r.refunds_sent for r in [first, *reports]) == 1 and sum(r.confirmed for r in reports) == 1
    assert refunds_by_id(chain)[escrow_id] == 1


def test_a_recorded_refund_the_node_refuses_for_its_fees_goes_out_again_at_its_nonce_with_higher_fees(
    chain: Chain, tmp_path: Path
) -> None:
    """Recorded bytes broadcast again (after a crash or an outage) can meet a base fee above their cap. That is a
    refusal of the fees, not of the refund: it quarantined the lone escrow for good; re-sent as the same bytes
    it would be refused forever and hold back every later nonce. It is re-signed at its nonce with higher fees."""
    escrow_id = _one_expired_escrow(chain)
    proxy = RpcProxy(chain.node.url)
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url, reorg_depth=0)
        # Refused when first sent and when sent again as it was: only new fees get it in.
        proxy.fail("eth_sendRawTransaction", {"code": -32000, "message": "max fee per gas less than block base fee"},
                   times=2)  # fmt: skip
        reports = [keeper.run_once() for _ in range(3)]
    finally:
        proxy.close()
    assert chain.escrow.state_of(escrow_id) is State.REFUNDED
    assert keeper.store.troubles(chain.escrow.address, "quarantined") == []
    # One nonce: the original, never accepted, dropped once its replacement was mined.
    assert keeper.store.attempt_counts() == {"dropped": 1, "final": 1}
    (mined,) = transactions_of(chain, KEEPER, int(chain.w3.eth.block_number) - 1)
    assert mined["status"] == 1
    assert sum(r.refunds_sent for r in reports) == 1 and sum(r.replaced for r in reports) == 1
    assert refunds_by_id(chain)[escrow_id] == 1


def test_logs_from_a_backend_behind_the_head_are_not_indexed_as_empty_blocks(chain: Chain, tmp_path: Path) -> None:
    """A load-balanced endpoint's backend a block behind the one that gave the head answers eth_getLogs for the
    block it has not seen with [] and no error. Taken as a quiet block, the deposit in it was never indexed and
    never refunded; the range's last block is read in the same batch, and a backend that lacks it is refused."""
    chain.mine()
    keeper_db = tmp_path / "k.sqlite"
    with RpcProxy(chain.node.url) as proxy:
        keeper = make_keeper(chain, keeper_db, rpc_url=proxy.url, reorg_depth=0)
        keeper.run_once()  # indexed up to here
        terms = make_terms(chain, window=60)
        deposit(chain, terms)
        escrow_id = chain.escrow.id_of(terms)
        proxy.seen_up_to = int(chain.w3.eth.block_number) - 1  # the deposit's block is past this backend
        with pytest.raises(RpcError, match="has not seen block"):
            keeper.run_once()
        proxy.heal()
        keeper.run_once()
        chain.mine(terms.deadline)
        for _ in range(3):
            keeper.run_once()
    assert chain.escrow.state_of(escrow_id) is State.REFUNDED
    assert refunds_by_id(chain)[escrow_id] == 1
