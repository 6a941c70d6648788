"""One hostile token cannot stall the refunds of honest escrows expiring beside it.

GasPriceCheckingToken's `transfer` reverts whenever the transaction pays for gas, so a
refund of its escrows passes every eth_call and gas estimate (they run at gas price 0) and
reverts when mined. A keeper that trusts its simulation re-sends the same failing batch
every cycle, paying gas each time, and the honest escrows in that batch are never refunded.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Chain
from helpers import BUYER, BUYER2, deposit, make_terms
from prometheus_client import generate_latest

from escrow_py.keeper import Keeper
from escrow_py.keeper._batch import fingerprint
from escrow_py.keeper._store import QUARANTINED
from escrow_py.terms import State, Terms

from .kit import KEEPER, cli, make_keeper, metric, refund_blocks, transactions_of
from .rpc_proxy import FaultProxy

HONEST = 12
HOSTILE = 3


def _expired_mix(chain: Chain) -> tuple[str, list[Terms], list[Terms], int]:
    """12 honest TestUSDC escrows and 3 of the hostile token, all expired in the latest block."""
    hostile_token = chain.deploy_token("GasPriceCheckingToken")
    honest = [make_terms(chain, window=100, buyer=BUYER if i % 2 else BUYER2) for i in range(HONEST)]
    hostile = [make_terms(chain, window=100, token=hostile_token.address, buyer=BUYER if i % 2 else BUYER2)
               for i in range(HOSTILE)]  # fmt: skip
    for terms in honest + hostile:
        deposit(chain, terms)
    chain.mine(honest[0].deadline)
    return hostile_token.address, honest, hostile, int(chain.w3.eth.block_number)


def _check_outcome(chain: Chain, keeper: Keeper, honest: list[Terms], hostile: list[Terms], *, deadline_block: int,
                   start: int, max_blocks: int, max_reverted: int, max_reverted_gas: int) -> None:  # fmt: skip
    honest_ids = {chain.escrow.id_of(t) for t in honest}
    hostile_ids = {chain.escrow.id_of(t) for t in hostile}
    refunded = refund_blocks(chain)
    assert honest_ids <= set(refunded), "an honest escrow was never refunded"
    assert max(refunded[i] for i in honest_ids) - deadline_block <= max_blocks
    assert all(chain.escrow.state_of(i) is State.HELD for i in hostile_ids)
    reverted = [r for r in transactions_of(chain, KEEPER, start) if r["status"] == 0]
    reverted_gas = sum(int(r["gasUsed"]) for r in reverted)  # type: ignore[call-overload]
    assert 1 <= len(reverted) <= max_reverted
    assert reverted_gas <= max_reverted_gas, f"{reverted_gas} gas lost to reverted refunds"
    # A set that reverted is never sent again: no two keeper transactions carried the same escrows.
    rows = keeper.store.conn.execute("SELECT ids FROM attempts ORDER BY created_at").fetchall()
    sets = [fingerprint([bytes.fromhex(i[2:]) for i in json.loads(r[0])]) for r in rows]
    assert len(sets) == len(set(sets))
    assert {t.id for t in keeper.store.troubles(chain.escrow.address, QUARANTINED)} == hostile_ids
    metrics = generate_latest(keeper.metrics.registry).decode()
    assert metric(metrics, "x402_keeper_quarantined_total") == HOSTILE
    assert metric(metrics, "x402_keeper_quarantined_open") == HOSTILE
    # Left alone from now on: no more transactions, however many cycles.
    sent = len(transactions_of(chain, KEEPER, start))
    for _ in range(3):
        chain.mine()
        keeper.run_once()
    assert len(transactions_of(chain, KEEPER, start)) == sent


def test_a_token_that_reverts_only_when_mined_costs_one_batch_and_honest_refunds_go_out_next_block(
    chain: Chain, tmp_path: Path
) -> None:
    start = int(chain.w3.eth.block_number)
    token, honest, hostile, deadline_block = _expired_mix(chain)
    # The operator allowed the token (an allowlist is a choice, not a proof of honesty): the keeper must cope.
    db = tmp_path / "k.sqlite"
    keeper = make_keeper(chain, db, tokens=f"{chain.token.address},{token}", reorg_depth=2)
    reports = [keeper.run_once() for _ in range(6)]  # automine: each keeper transaction is its own block

    # One batch of 15 reverts when mined (about 127k gas); replayed with its own gas price it names the
    # token, the hostile escrows are quarantined without another transaction, the honest 12 go out next block.
    _check_outcome(chain, keeper, honest, hostile, deadline_block=deadline_block, start=start, max_blocks=2,
                   max_reverted=1, max_reverted_gas=150_000)  # fmt: skip
    assert sum(r.quarantined for r in reports) == HOSTILE
    keeper.close()
    status = cli("keeper", "status", "--rpc", chain.node.url, "--escrow", chain.escrow.address, "--database", str(db))
    assert status.returncode == 0, status.stderr
    assert f"quarantined: {HOSTILE}" in status.stdout
    assert status.stdout.count("PaidTransferRefused") == HOSTILE  # the token's own reason, decoded


def test_when_the_revert_cannot_be_replayed_the_batch_is_bisected_on_chain_and_the_gas_lost_stays_bounded(
    chain: Chain, tmp_path: Path
) -> None:
    """A node that refuses eth_call with fee fields: the keeper falls back to splitting the batch by mining it."""
    start = int(chain.w3.eth.block_number)
    token, honest, hostile, deadline_block = _expired_mix(chain)
    proxy = FaultProxy(chain.node.url)
    proxy.fail_if("eth_call", lambda params: bool(params) and "maxFeePerGas" in params[0])
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url,
                             tokens=f"{chain.token.address},{token}", reorg_depth=2)  # fmt: skip
        for _ in range(8):
            keeper.run_once()
        # The batch of 15 reverts, is split by token: the honest part is refunded, the hostile part (3) reverts
        # and is split in three, and each hostile escrow reverts alone and is quarantined: 5 reverted
        # transactions, about 290k gas, once.
        _check_outcome(chain, keeper, honest, hostile, deadline_block=deadline_block, start=start, max_blocks=3,
                       max_reverted=1 + 1 + HOSTILE, max_reverted_gas=350_000)  # fmt: skip
    finally:
        proxy.close()
