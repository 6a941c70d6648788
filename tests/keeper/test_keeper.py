"""The keeper on a real anvil: it refunds what expired, touches nothing else, survives restarts and reorgs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import Chain
from helpers import BUYER, deposit, dev, make_terms
from hexbytes import HexBytes

from escrow_py.chain.anvil import dev_private_key
from escrow_py.chain.artifacts import load_artifact
from escrow_py.keeper import CycleReport, Keeper, KeeperConfig, OpenEscrow, Refund, Skip, Wait, next_action
from escrow_py.terms import State, Terms

KEEPER = 7  # an anvil dev account no other role uses


def _keeper(chain: Chain, db: Path, **settings: object) -> Keeper:
    config = KeeperConfig.load({"rpc_url": chain.node.url, "escrows": chain.escrow.address, "database": str(db),
                                **settings})  # fmt: skip
    return Keeper(config, dev(KEEPER))


def _refund_events(chain: Chain, terms: Terms) -> int:
    escrow_id = chain.escrow.id_of(terms)
    events = chain.escrow.events(0, int(chain.w3.eth.block_number))
    return sum(1 for e in events if e.id == escrow_id and type(e).__name__ == "Refunded")


def test_next_action_is_decided_by_chain_time_alone() -> None:
    terms = Terms(dev(1).address, dev(2).address, dev(3).address, dev(4).address, 5, 1_000, b"\0" * 32, b"\1" * 32)
    open_ = OpenEscrow("0x", b"\2" * 32, terms, in_flight=False, retry_at=None)
    assert next_action(open_, 999, wall_time=10**10) == Wait(1_000)  # a wall clock far ahead changes nothing
    assert next_action(open_, 1_000, wall_time=0) == Refund()
    in_flight = OpenEscrow("0x", b"\2" * 32, terms, in_flight=True, retry_at=None)
    assert isinstance(next_action(in_flight, 2_000, wall_time=0), Skip)
    failed = OpenEscrow("0x", b"\2" * 32, terms, in_flight=False, retry_at=50.0)
    assert isinstance(next_action(failed, 2_000, wall_time=49.0), Skip)
    assert next_action(failed, 2_000, wall_time=51.0) == Refund()
    assert isinstance(next_action(open_, 2_000, wall_time=0, buyers={dev(9).address}), Skip)
    assert next_action(open_, 2_000, wall_time=0, sellers={terms.seller}) == Refund()


def test_refunds_after_the_deadline_and_nothing_before(chain: Chain, tmp_path: Path) -> None:
    early = make_terms(chain, window=100)
    also_early = make_terms(chain, window=100, amount=7_000)
    late = make_terms(chain, window=10_000)
    for terms in (early, also_early, late):
        deposit(chain, terms)
    keeper = _keeper(chain, tmp_path / "k.sqlite")
    buyer_before = chain.token.balance_of(early.buyer)

    report = keeper.run_once()
    assert report.refunds_sent == 0
    assert {chain.escrow.state_of(chain.escrow.id_of(t)) for t in (early, also_early, late)} == {State.HELD}

    chain.mine(early.deadline)  # chain time reaches the deadline: refundable by anyone
    report = keeper.run_once()
    assert (report.refunds_sent, report.batches_sent) == (2, 1)
    assert chain.escrow.state_of(chain.escrow.id_of(early)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(also_early)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(late)) is State.HELD
    assert chain.token.balance_of(early.buyer) == buyer_before + early.amount + also_early.amount

    report = keeper.run_once()  # confirms, and sends nothing again
    assert report.refunds_sent == 0 and report.confirmed == 2
    assert keeper.store.counts(chain.escrow.address) == {"held": 1, "released": 0, "refunded": 2}
    assert _refund_events(chain, early) == 1


def test_restart_resumes_from_the_checkpoint(chain: Chain, tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    first = _keeper(chain, db)
    deposit(chain, make_terms(chain, window=100))
    checkpoint = first.run_once().indexed_to[chain.escrow.address]
    first.close()
    for _ in range(3):
        chain.mine()
    second = _keeper(chain, db, reorg_depth=0)
    assert second.store.checkpoint(chain.escrow.address) == checkpoint
    assert len(second.store.open_escrows(chain.escrow.address)) == 1
    assert second.run_once().indexed_to[chain.escrow.address] == checkpoint + 3


def test_a_reorg_that_removes_a_deposit_is_undone(chain: Chain, tmp_path: Path) -> None:
    keeper = _keeper(chain, tmp_path / "k.sqlite", reorg_depth=5)
    deposit(chain, make_terms(chain, window=100))
    keeper.index()
    assert len(keeper.store.open_escrows(chain.escrow.address)) == 1
    chain.w3.provider.make_request("anvil_reorg", [1, []])  # type: ignore[arg-type]
    keeper.index()
    assert keeper.store.open_escrows(chain.escrow.address) == []


def test_a_reorg_that_removes_a_refund_brings_the_escrow_back_and_it_is_refunded_again(
    chain: Chain, tmp_path: Path
) -> None:
    keeper = _keeper(chain, tmp_path / "k.sqlite", reorg_depth=5, replace_after=0)
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    assert keeper.run_once().refunds_sent == 1
    keeper.index()
    assert keeper.store.counts(chain.escrow.address)["refunded"] == 1
    chain.w3.provider.make_request("anvil_reorg", [1, []])  # type: ignore[arg-type]  # the refund's block is gone
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    keeper.run_once()  # the escrow is open again; the lost attempt is followed up and re-sent
    keeper.run_once()
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
    assert _refund_events(chain, terms) == 1


def test_a_refund_that_fails_in_simulation_does_not_block_the_others(chain: Chain, tmp_path: Path) -> None:
    token = chain.deploy_token("BlockingToken")
    stuck = make_terms(chain, token=token.address, window=100)
    fine = make_terms(chain, window=100)
    deposit(chain, stuck)
    deposit(chain, fine)
    blocking = chain.w3.eth.contract(address=token.address, abi=load_artifact("BlockingToken")["abi"])
    block = blocking.encode_abi("setBlocked", args=[dev(BUYER).address])
    chain.deployer.transact(token.address, bytes.fromhex(block.removeprefix("0x")))
    chain.mine(fine.deadline)
    _keeper(chain, tmp_path / "k.sqlite").run_once()
    # refundMany puts a refused payout back to Held (PayoutFailed) instead of reverting: the blocked
    # buyer's escrow no longer fails the simulation, and the batch refunds the other one regardless.
    assert chain.escrow.state_of(chain.escrow.id_of(fine)) is State.REFUNDED
    assert chain.escrow.state_of(chain.escrow.id_of(stuck)) is State.HELD


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "escrow_py.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)  # fmt: skip


def test_bad_configuration_exits_non_zero_saying_what_to_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_")}
    out = _cli("keeper", "run", "--escrow", "0x" + "11" * 20, env=env)
    assert out.returncode == 2 and "no RPC URL: pass --rpc" in out.stderr
    out = _cli("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0xnope", env=env)
    assert out.returncode == 2 and "'0xnope' is not an address" in out.stderr
    out = _cli("keeper", "run", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20, env=env)
    assert out.returncode == 2 and "X402_ESCROW_PRIVATE_KEY is not set" in out.stderr
    out = _cli("keeper", "status", "--rpc", "http://127.0.0.1:1", "--escrow", "0x" + "11" * 20,
               "--database", "postgresql://db/keeper", env=env)  # fmt: skip
    assert out.returncode == 2 and "only SQLite is supported" in out.stderr
    toml = tmp_path / "keeper.toml"
    toml.write_text('[keeper]\nrpc_url = "http://127.0.0.1:1"\nbatchsize = 3\n')
    out = _cli("keeper", "run", "--config", str(toml), env=env)
    assert out.returncode == 2 and "unknown settings ['batchsize']" in out.stderr


def test_keeper_process_refunds_reports_status_and_stops_on_sigterm(chain: Chain, tmp_path: Path) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    db = str(tmp_path / "k.sqlite")
    env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(KEEPER)}
    args = ["--rpc", chain.node.url, "--escrow", chain.escrow.address, "--database", db]
    proc = subprocess.Popen([sys.executable, "-m", "escrow_py.cli", "keeper", "run", *args, "--poll-interval", "0.2",
                             "--log-json"], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while chain.escrow.state_of(chain.escrow.id_of(terms)) is not State.REFUNDED:
            assert time.monotonic() < deadline, "keeper did not refund"
            time.sleep(0.2)
        time.sleep(1.0)  # a few more cycles: the keeper indexes its own refund
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert '"msg": "refund batch sent"' in stderr
    assert env["X402_ESCROW_PRIVATE_KEY"][2:] not in stderr  # the key is never logged
    status = _cli("keeper", "status", *args)
    assert status.returncode == 0, status.stderr
    assert "held 0, released 0, refunded 1" in status.stdout


def test_two_keepers_at_once_refund_everything_exactly_once_and_waste_little(chain: Chain, tmp_path: Path) -> None:
    batch = [make_terms(chain, window=100) for _ in range(6)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(batch[0].deadline)
    first = _keeper(chain, tmp_path / "a.sqlite")
    second = Keeper(KeeperConfig.load({"rpc_url": chain.node.url, "escrows": chain.escrow.address,
                                       "database": str(tmp_path / "b.sqlite")}), dev(8))  # fmt: skip
    second.index()  # the second keeper's view is now stale: it believes all six are open
    assert first.run_once().refunds_sent == 6
    report = CycleReport()
    second.act(report)
    assert report.refunds_sent == 0  # its simulation said refundMany would refund nothing: nothing sent
    for terms in batch:
        assert _refund_events(chain, terms) == 1
    assert chain.w3.eth.get_transaction_count(dev(8).address) == 0  # not one wasted transaction


def test_a_stuck_refund_is_replaced_with_higher_fees_and_lands_once(chain: Chain, tmp_path: Path) -> None:
    terms = make_terms(chain, window=100)
    deposit(chain, terms)
    chain.mine(terms.deadline)
    keeper = _keeper(chain, tmp_path / "k.sqlite", replace_after=0)
    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        assert keeper.run_once().refunds_sent == 1  # broadcast, but no block is coming
        [stuck] = keeper.store.open_attempts(chain.escrow.address)
        report = keeper.run_once()
        assert report.replaced == 1 and report.refunds_sent == 0
        [replacement] = keeper.store.open_attempts(chain.escrow.address)
        assert replacement.nonce == stuck.nonce
        assert int(replacement.tx["maxPriorityFeePerGas"]) >= int(stuck.tx["maxPriorityFeePerGas"]) * 1.1  # type: ignore[call-overload]
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    report = keeper.run_once()
    assert report.confirmed == 1
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.REFUNDED
    assert _refund_events(chain, terms) == 1
    assert chain.w3.eth.get_transaction_receipt(HexBytes(replacement.tx_hash))["status"] == 1


def test_two_keeper_daemons_running_together_refund_each_escrow_once(chain: Chain, tmp_path: Path) -> None:
    batch = [make_terms(chain, window=100) for _ in range(12)]
    for terms in batch:
        deposit(chain, terms)
    chain.mine(batch[0].deadline)
    keepers = [
        Keeper(KeeperConfig.load({"rpc_url": chain.node.url, "escrows": chain.escrow.address, "poll_interval": 0.05,
                                  "batch_size": 5, "database": str(tmp_path / f"{who}.sqlite")}), dev(who))
        for who in (KEEPER, 8)
    ]  # fmt: skip
    stop = threading.Event()
    threads = [threading.Thread(target=k.run, args=(stop,)) for k in keepers]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while any(chain.escrow.state_of(chain.escrow.id_of(t)) is not State.REFUNDED for t in batch):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # let both index the outcome
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert all(_refund_events(chain, t) == 1 for t in batch)
    # Wasted work is bounded: at most one transaction per batch per keeper (3 batches of 5 or fewer).
    sent = sum(chain.w3.eth.get_transaction_count(dev(who).address) for who in (KEEPER, 8))
    assert 3 <= sent <= 6
