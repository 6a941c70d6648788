"""The keeper on a real anvil: it refunds what expired, touches nothing else, survives restarts and reorgs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from eth_typing import ChecksumAddress
from fixtures.chain import Chain
from fixtures.cli import InProcessCli
from helpers import BUYER, BUYER2, deposit, dev, make_terms, offline_terms
from hexbytes import HexBytes
from prometheus_client import generate_latest

from escrow_devtools.artifacts import load_artifact
from escrow_py.keeper import CycleReport, Keeper, KeeperConfig, OpenEscrow, Refund, Skip, Wait, next_action
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import State, Terms

from .kit import KEEPER, KEEPER2, cli, keeper_env, make_keeper, mined, refunds_by_id, transactions_of, wait_until


def _refund_events(chain: Chain, terms: Terms) -> int:
    return refunds_by_id(chain).get(chain.escrow.id_of(terms), 0)


def test_next_action_is_decided_by_chain_time_alone() -> None:
    terms = offline_terms(5, 1_000, salt=b"\1" * 32)
    open_ = OpenEscrow.of("0x", b"\2" * 32, terms)
    assert next_action(open_, 999, wall_time=10**10) == Wait(1_000)  # a wall clock far ahead changes nothing
    assert next_action(open_, 1_000, wall_time=0) == Refund()
    in_flight = OpenEscrow.of("0x", b"\2" * 32, terms, in_flight=True)
    assert isinstance(next_action(in_flight, 2_000, wall_time=0), Skip)
    failed = OpenEscrow.of("0x", b"\2" * 32, terms, retry_at=50.0)
    assert isinstance(next_action(failed, 2_000, wall_time=49.0), Skip)
    assert next_action(failed, 2_000, wall_time=51.0) == Refund()
    assert isinstance(next_action(open_, 2_000, wall_time=0, buyers={dev(9).address.lower()}), Skip)
    assert next_action(open_, 2_000, wall_time=0, sellers={terms.seller.lower()}) == Refund()
    # The token allowlist (None: any token), a quarantine, and a standby's delay.
    assert next_action(open_, 2_000, wall_time=0, tokens=frozenset()) == Skip("token not in the allowlist")
    assert next_action(open_, 2_000, wall_time=0, tokens={terms.token.lower()}) == Refund()
    assert next_action(open_, 2_000, wall_time=0, tokens=None) == Refund()
    quarantined = OpenEscrow.of("0x", b"\2" * 32, terms, quarantined="reverted when mined")
    assert next_action(quarantined, 2_000, wall_time=0) == Skip("quarantined: reverted when mined")
    assert next_action(open_, 1_059, wall_time=0, standby_after=60) == Wait(1_060)
    assert next_action(open_, 1_060, wall_time=0, standby_after=60) == Refund()


def test_refunds_after_the_deadline_and_nothing_before(chain: Chain, tmp_path: Path) -> None:
    early = make_terms(chain, window=100)
    # The same deadline, not the same window: a second may pass between the two (each deposit mines a block).
    also_early = make_terms(chain, deadline=early.deadline, amount=7_000)
    late = make_terms(chain, window=10_000)
    for terms in (early, also_early, late):
        deposit(chain, terms)
    keeper = make_keeper(chain, tmp_path / "k.sqlite", reorg_depth=0)
    buyer_before = chain.token.balance_of(early.buyer)

    report = keeper.run_once()
    assert report.refunds_sent == 0
    assert {chain.escrow.state_of(chain.escrow.id_of(t)) for t in (early, also_early, late)} == {State.HELD}

    chain.mine(early.deadline)  # chain time reaches the deadline: refundable by anyone
    sent_from = int(chain.w3.eth.block_number) + 1
    report = keeper.run_once()
    assert (report.refunds_sent, report.batches_sent) == (2, 1)
    mined(chain, KEEPER, sent_from, 1)  # automine mines it just after the node answers
    assert chain.escrow.state_of(chain.escrow.id_of(early)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(also_early)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(late)) is State.HELD
    assert chain.token.balance_of(early.buyer) == buyer_before + early.amount + also_early.amount

    report = keeper.run_once()  # confirms, and sends nothing again
    assert report.refunds_sent == 0 and report.confirmed == 2
    assert keeper.store.counts(chain.escrow.address) == {"held": 1, "released": 0, "refunded": 2}
    assert _refund_events(chain, early) == 1


def test_a_retention_prunes_settled_escrows_past_their_deadline_hourly(chain: Chain, db_url: str) -> None:
    keeper = make_keeper(chain, db_url, retention=3600, reorg_depth=0)
    settled, still_open = make_terms(chain, window=60), make_terms(chain, window=100_000, buyer=BUYER2)
    deposit(chain, settled)
    deposit(chain, still_open)
    chain.mine(settled.deadline)
    assert keeper.run_once().refunds_sent == 1
    keeper.run_once()  # confirms
    ids = [chain.escrow.id_of(t) for t in (settled, still_open)]
    assert len(keeper.store.entries(chain.escrow.address, ids)) == 2  # within the retention: kept
    keeper.clock = lambda: settled.deadline + 3 * 3600.0  # the wall clock moves on; the next prune is due
    chain.mine()
    keeper.run_once()
    [kept] = keeper.store.entries(chain.escrow.address, ids)
    assert kept.id == chain.escrow.id_of(still_open)  # open: kept however long it waits
    assert keeper.store.counts(chain.escrow.address) == {"held": 1, "released": 0, "refunded": 1}
    assert keeper.store.attempt_counts() == {}  # its final refund transaction went with it
    with pytest.raises(ConfigError, match=r"retention = 60: expected 0 \(keep everything\) or at least 3600 seconds"):
        make_keeper(chain, db_url, retention=60)


def test_restart_resumes_from_the_checkpoint(chain: Chain, tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    first = make_keeper(chain, db)
    deposit(chain, make_terms(chain, window=100))
    checkpoint = first.run_once().indexed_to[chain.escrow.address]
    first.close()
    for _ in range(3):
        chain.mine()
    second = make_keeper(chain, db)
    assert second.store.checkpoint(chain.escrow.address) == checkpoint
    assert len(second.store.open_escrows(chain.escrow.address)) == 1
    assert second.run_once().indexed_to[chain.escrow.address] == checkpoint + 3
    # Nothing new was indexed, yet the restarted keeper's gauges show what its store holds.
    metrics = generate_latest(second.metrics.registry).decode()
    assert 'x402_keeper_escrows{state="held"} 1.0' in metrics
    assert "x402_keeper_quarantined_open 0.0" in metrics


def test_a_reorg_that_removes_a_deposit_is_undone(chain: Chain, tmp_path: Path) -> None:
    keeper = make_keeper(chain, tmp_path / "k.sqlite")
    deposit(chain, make_terms(chain, window=100))
    keeper.index()
    assert len(keeper.store.open_escrows(chain.escrow.address)) == 1
    chain.w3.provider.make_request("anvil_reorg", [1, []])  # type: ignore[arg-type]
    keeper.index()
    assert keeper.store.open_escrows(chain.escrow.address) == []
    assert keeper.store.counts(chain.escrow.address)["held"] == 0


def test_a_reorg_that_removes_a_refund_gets_it_mined_again_and_the_next_refund_is_not_stuck_behind_a_gap(
    chain: Chain, tmp_path: Path
) -> None:
    """The keeper follows its transaction until reorg_depth; a reorg that drops it does not leave a nonce gap.

    anvil_reorg drops the reorged transactions and rewinds the key's nonce; a keeper that trusted its
    cached next nonce would queue every later refund behind the missing one, never mined.
    """
    keeper = make_keeper(chain, tmp_path / "k.sqlite", reorg_depth=3)
    first = make_terms(chain, window=100)
    second = make_terms(chain, window=200, buyer=BUYER2)
    deposit(chain, first)
    deposit(chain, second)
    chain.mine(first.deadline)
    sent_from = int(chain.w3.eth.block_number) + 1
    assert keeper.run_once().refunds_sent == 1
    mined(chain, KEEPER, sent_from, 1)  # automine mines it just after the node answers
    keeper.run_once()  # sees the receipt; the transaction is 1 block deep, not final
    [attempt] = keeper.store.tracked_attempts(dev(KEEPER).address)
    assert attempt.status == "mined"
    nonce_before = chain.w3.eth.get_transaction_count(dev(KEEPER).address)
    chain.w3.provider.make_request("anvil_reorg", [1, []])  # type: ignore[arg-type]  # the refund's block is gone
    assert chain.escrow.state_of(chain.escrow.id_of(first)) is State.HELD
    assert chain.w3.eth.get_transaction_count(dev(KEEPER).address) == nonce_before - 1

    report = keeper.run_once()  # the reorg is seen: the same transaction goes out again, the cached nonce is dropped
    assert report.reorged == 1
    wait_until(lambda: chain.escrow.state_of(chain.escrow.id_of(first)) is State.REFUNDED, "first refunded again")
    chain.mine(second.deadline)
    keeper.run_once()
    keeper.run_once()
    # Not queued behind a nonce gap (anvil mines just after the send answers: wait, a gap never gets mined).
    wait_until(lambda: chain.escrow.state_of(chain.escrow.id_of(second)) is State.REFUNDED, "second refunded", 30)
    assert refunds_by_id(chain) == {chain.escrow.id_of(first): 1, chain.escrow.id_of(second): 1}
    for _ in range(4):
        chain.mine()
    report = keeper.run_once()
    assert keeper.store.tracked_attempts(dev(KEEPER).address) == []  # every transaction followed to depth 3
    assert keeper.store.attempt_counts() == {"final": 2}


def _set_blocked(chain: Chain, token: ChecksumAddress, who: str) -> None:
    blocking = chain.w3.eth.contract(address=token, abi=load_artifact("BlockingToken")["abi"])
    data = blocking.encode_abi("setBlocked", args=[who])
    chain.deployer.transact(token, bytes.fromhex(data.removeprefix("0x")))


def test_a_refund_that_fails_in_simulation_does_not_block_the_others(chain: Chain, tmp_path: Path) -> None:
    """A blacklisted buyer: its refund is backed off per (token, buyer), not retried every block, and goes out
    once the blacklist lifts and the wait is over."""
    token = chain.deploy_token("BlockingToken")
    stuck = make_terms(chain, token=token.address, window=100)
    also_stuck = make_terms(chain, token=token.address, window=100)
    fine = make_terms(chain, window=100)
    for terms in (stuck, also_stuck, fine):
        deposit(chain, terms)
    _set_blocked(chain, token.address, dev(BUYER).address)
    chain.mine(fine.deadline)
    db = tmp_path / "k.sqlite"
    keeper = make_keeper(chain, db, tokens=f"{chain.token.address},{token.address}", reorg_depth=0)
    # refundMany puts a refused payout back to Held (PayoutFailed) instead of reverting, and the simulation
    # shows it: the blocked buyer's escrows are left out, the other one goes out.
    sent_from = int(chain.w3.eth.block_number) + 1
    report = keeper.run_once()
    assert report.refunds_sent == 1 and report.payouts_refused == 1 and report.covered == 0
    mined(chain, KEEPER, sent_from, 1)  # automine mines it just after the node answers
    assert chain.escrow.state_of(chain.escrow.id_of(fine)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(stuck)) is State.HELD
    [backoff] = keeper.store.backoffs(chain.escrow.address)
    assert (backoff.token, backoff.buyer, backoff.failures, backoff.open_escrows) == (
        token.address.lower(), dev(BUYER).address.lower(), 1, 2)  # fmt: skip
    assert "RecipientBlocked" in backoff.reason  # the token's own reason
    # Backed off: block after block, neither a transaction nor even a simulation of the blocked buyer's escrows.
    start = int(chain.w3.eth.block_number) + 1
    reports = []
    for _ in range(5):
        chain.mine()
        reports.append(keeper.run_once())
    assert sum(r.payouts_refused + r.covered + r.refunds_sent for r in reports) == 0
    assert transactions_of(chain, KEEPER, start) == []
    text = generate_latest(keeper.metrics.registry).decode()
    assert 'x402_keeper_payouts_refused_total{stage="simulation"} 1.0' in text
    assert "x402_keeper_backoffs 1.0" in text
    status = cli("keeper", "status", "--rpc", chain.node.url, "--escrow", chain.escrow.address, "--database", str(db))
    assert status.returncode == 0, status.stderr
    assert "refunds the token refused, backing off: 1 buyers (2 escrows)" in status.stdout
    assert "RecipientBlocked" in status.stdout
    # The wait is over while the buyer is still blocked: tried once more (a simulation, no gas), waiting twice as long.
    later = time.time() + 301
    keeper.clock = lambda: later
    chain.mine()
    assert keeper.run_once().payouts_refused == 1
    [backoff] = keeper.store.backoffs(chain.escrow.address)
    assert backoff.failures == 2 and backoff.retry_at == pytest.approx(later + 600)
    # The blacklist lifts; after the wait both escrows are refunded in one transaction, and the backoff ends.
    _set_blocked(chain, token.address, "0x" + "00" * 20)
    keeper.clock = lambda: later + 599
    assert keeper.run_once().refunds_sent == 0
    keeper.clock = lambda: later + 601
    chain.mine()  # the keeper acts on a new block
    assert keeper.run_once().refunds_sent == 2
    mined(chain, KEEPER, start, 1)
    assert {chain.escrow.state_of(chain.escrow.id_of(t)) for t in (stuck, also_stuck)} == {State.REFUNDED}
    keeper.run_once()
    assert keeper.store.backoffs(chain.escrow.address) == []
    assert keeper.store.db.one("SELECT COUNT(*) FROM backoffs") == (0,)


def test_escrows_of_a_token_outside_the_allowlist_are_left_alone_and_status_says_so(
    chain: Chain, tmp_path: Path
) -> None:
    """By default only the registry's tokens for the network are refunded (here Base Sepolia's USDC)."""
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    db = tmp_path / "k.sqlite"
    keeper = Keeper(KeeperConfig.load({"rpc_url": chain.node.url, "escrows": chain.escrow.address,
                                       "database": str(db)}), dev(KEEPER))  # fmt: skip
    assert chain.token.address.lower() not in (keeper.tokens or ())
    report = keeper.run_once()
    assert report.refunds_sent == 0 and chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    keeper.close()
    status = cli("keeper", "status", "--rpc", chain.node.url, "--escrow", chain.escrow.address, "--database", str(db))
    assert status.returncode == 0, status.stderr
    assert "left alone, token not in the allowlist: 1" in status.stdout
    allowed = make_keeper(chain, db)  # --token adds TestUSDC
    assert allowed.run_once().refunds_sent == 1


@pytest.mark.integration  # runs the CLI in a subprocess (and in-process)
def test_bad_configuration_exits_non_zero_saying_what_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process_cli: InProcessCli
) -> None:
    env = keeper_env()
    del env["X402_ESCROW_PRIVATE_KEY"]
    # The command as its own process: exit status 2 and one line, no traceback.
    out = cli("keeper", "run", "--escrow", "0x" + "11" * 20, env=env)
    assert out.returncode == 2 and "no RPC URL: pass --rpc" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    # Every other setting through the same entry point in this process (a keeper process start costs a second
    # and a half of CPU): the same exit status and message; an uncaught exception would fail the test here.
    for name in [k for k in os.environ if k.startswith("X402_")]:
        monkeypatch.delenv(name)

    def run(*args: str) -> str:
        printed = in_process_cli(*args)
        assert "Traceback" not in printed.stderr + printed.stdout
        assert printed.returncode == 2, (args, printed)
        return printed.stderr

    stderr = run("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0xnope")
    assert "escrows is not an address: '0xnope'" in stderr
    stderr = run("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20)
    assert "X402_ESCROW_PRIVATE_KEY is not set" in stderr
    stderr = run("keeper", "status", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20,
                 "--database", "mysql://db/keeper")  # fmt: skip
    assert "expected a SQLite path, sqlite:///path or postgresql://" in stderr
    stderr = run("keeper", "status", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20,
                 "--database", "postgresql://keeper:hunter2@127.0.0.1:1/keeper")  # fmt: skip
    assert "postgresql://keeper:***@127.0.0.1:1/keeper: cannot open" in stderr
    assert "hunter2" not in stderr
    toml = tmp_path / "keeper.toml"
    toml.write_text('[keeper]\nrpc_url = "http://127.0.0.1:1"\nbatchsize = 3\n')
    stderr = run("keeper", "run", "--config", str(toml))
    assert "unknown settings ['batchsize']" in stderr


@pytest.mark.parametrize("log_format", ["json", "plain"])
def test_keeper_process_refunds_reports_status_and_stops_on_sigterm(
    chain: Chain, tmp_path: Path, log_format: str
) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    db = str(tmp_path / "k.sqlite")
    env = keeper_env()
    args = ["--rpc", chain.node.url, "--escrow", chain.escrow.address, "--token", chain.token.address,
            "--database", db]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "escrow_py.cli", "keeper", "run", *args, "--poll-interval", "0.2",
                             *(["--log-json"] if log_format == "json" else [])],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED, "keeper refund", 60)
        time.sleep(1.0)  # a few more cycles: the keeper indexes its own refund
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    if log_format == "json":
        assert '"msg": "refund batch sent"' in stderr and '"logger": "escrow_py.keeper"' in stderr
    else:
        # Plain text keeps the record's fields (the transaction, how many escrows), one line each.
        sent = [line for line in stderr.splitlines() if "INFO escrow_py.keeper refund batch sent" in line]
        assert len(sent) == 1, stderr
        assert " tx=0x" in sent[0] and " escrows=1" in sent[0], sent[0]
    assert env["X402_ESCROW_PRIVATE_KEY"][2:] not in stderr  # the key is never logged
    status = cli("keeper", "status", *args)
    assert status.returncode == 0, status.stderr
    assert "held 0, released 0, refunded 1" in status.stdout
    assert "quarantined: 0" in status.stdout


def test_a_second_keeper_with_a_stale_view_sends_nothing(chain: Chain, tmp_path: Path) -> None:
    batch = [make_terms(chain, window=100) for _ in range(6)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    first = make_keeper(chain, tmp_path / "a.sqlite")
    second = make_keeper(chain, tmp_path / "b.sqlite", who=KEEPER2)
    second.index()  # the second keeper's view is now stale: it believes all six are open
    assert first.run_once().refunds_sent == 6
    report = CycleReport()
    second.act(report)
    assert report.refunds_sent == 0 and report.covered == 6  # its simulation said refundMany would refund nothing
    for terms in batch:
        assert _refund_events(chain, terms) == 1
    assert chain.w3.eth.get_transaction_count(dev(KEEPER2).address) == 0  # not one wasted transaction


def test_a_stuck_refund_is_replaced_with_higher_fees_and_lands_once(chain: Chain, tmp_path: Path) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    keeper = make_keeper(chain, tmp_path / "k.sqlite", replace_after=0, reorg_depth=0)
    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        assert keeper.run_once().refunds_sent == 1  # broadcast, but no block is coming
        [stuck] = keeper.store.tracked_attempts(dev(KEEPER).address)
        report = keeper.run_once()
        assert report.replaced == 1 and report.refunds_sent == 0
        stuck_tx = keeper.store.attempt_tx(stuck.tx_hash)
        [old, replacement] = keeper.store.tracked_attempts(dev(KEEPER).address)
        assert (old.tx_hash, old.status) == (stuck.tx_hash, "replaced")
        assert replacement.nonce == stuck.nonce
        bumped = keeper.store.attempt_tx(replacement.tx_hash).tx["maxPriorityFeePerGas"]
        assert bumped >= stuck_tx.tx["maxPriorityFeePerGas"] * 1.1
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    report = keeper.run_once()
    assert report.confirmed == 1
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
    assert _refund_events(chain, terms) == 1
    assert chain.w3.eth.get_transaction_receipt(HexBytes(replacement.tx_hash))["status"] == 1
    assert keeper.store.attempt_counts() == {"final": 1, "dropped": 1}


def test_two_keeper_daemons_running_together_refund_each_escrow_once(chain: Chain, tmp_path: Path) -> None:
    start = int(chain.w3.eth.block_number)
    batch = [make_terms(chain, window=100) for _ in range(12)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in batch))  # the last deposit has the latest deadline
    keepers = [make_keeper(chain, tmp_path / f"{who}.sqlite", who=who, poll_interval=0.05, batch_size=5)
               for who in (KEEPER, KEEPER2)]  # fmt: skip
    stop = threading.Event()
    threads = [threading.Thread(target=k.run, args=(stop,)) for k in keepers]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(_refund_events(chain, t) == 1 for t in batch), "all refunded", 60)
        time.sleep(0.5)  # let both index the outcome
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert all(_refund_events(chain, t) == 1 for t in batch)
    # Wasted work is bounded: at most one transaction per batch per keeper (3 batches of 5 or fewer).
    sent = [r for who in (KEEPER, KEEPER2) for r in transactions_of(chain, who, start)]
    assert 3 <= len(sent) <= 6
    assert all(r["status"] == 1 for r in sent)
