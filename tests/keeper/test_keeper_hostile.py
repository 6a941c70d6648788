"""One hostile token cannot stall the refunds of honest escrows expiring beside it, nor drain the keeper.

Two tokens whose transfers pass every eth_call and gas estimate (they run at gas price 0) and
misbehave once mined (the transaction pays for gas):
- SimulationOnlyToken reverts. refundMany puts that payout's entries back to Held (PayoutFailed) and
  refunds the rest of the batch; the keeper backs off that (token, buyer), or it would pay for the
  same failed payout in every block.
- GasBurningToken burns all the gas it is given. Each payout is capped, so one only fails; but several,
  to distinct buyers, outspend the gas the keeper budgets per entry, and the batch reverts when mined
  (InsufficientGas). The keeper never sends that set again: it splits it, by token first.
"""

from __future__ import annotations

import time
from pathlib import Path

from fixtures.chain import DEPLOYER, STRANGER, Chain
from helpers import BUYER, BUYER2, deposit, dev, make_terms
from prometheus_client import generate_latest
from rpc_proxy import INTERNAL_ERROR, RpcProxy

from escrow_py.keeper._batch import PAYOUT_GAS, fingerprint
from escrow_py.keeper._store import QUARANTINED
from escrow_py.protocol.terms import State

from .kit import KEEPER, cli, make_keeper, mined, refund_blocks, transactions_of

SELLER2 = 6


def test_a_payout_the_token_refuses_only_when_mined_is_backed_off_not_resent_every_block(
    chain: Chain, tmp_path: Path
) -> None:
    """The first batch refunds the honest escrows beside the hostile ones; the refused payouts (PayoutFailed)
    back off per (token, buyer), so the keeper pays for one failed payout per buyer and wait, not per block."""
    hostile = chain.deploy_token("SimulationOnlyToken")
    refused = [make_terms(chain, token=hostile.address, window=100, buyer=b) for b in (BUYER, BUYER2, BUYER)]
    honest = [make_terms(chain, window=100, buyer=BUYER if i % 2 else BUYER2) for i in range(12)]
    for terms in refused + honest:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in honest))  # the last deposit has the latest deadline
    deadline_block = int(chain.w3.eth.block_number)
    db = tmp_path / "k.sqlite"
    # The operator allowed the token (an allowlist is a choice, not a proof of honesty): the keeper must cope.
    keeper = make_keeper(chain, db, tokens=f"{chain.token.address},{hostile.address}", reorg_depth=0)
    now = time.time()
    keeper.clock = lambda: now
    reports = [keeper.run_once()]  # sent
    mined(chain, KEEPER, deadline_block + 1, 1)
    reports.append(keeper.run_once())  # then its receipt is read
    [receipt] = transactions_of(chain, KEEPER, deadline_block + 1)
    assert receipt["status"] == 1 and receipt["blockNumber"] == deadline_block + 1
    refunded = refund_blocks(chain)
    assert all(refunded[chain.escrow.id_of(t)] == deadline_block + 1 for t in honest)  # in the very next block
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.HELD for t in refused)
    assert sum(r.payouts_refused for r in reports) == 2  # one PayoutFailed per buyer
    assert sum(r.confirmed for r in reports) == len(honest)
    backoffs = keeper.store.backoffs(chain.escrow.address)
    assert sorted((b.buyer, b.failures, b.open_escrows) for b in backoffs) == sorted(
        [(dev(BUYER).address.lower(), 1, 2), (dev(BUYER2).address.lower(), 1, 1)])  # fmt: skip
    assert all("OnlyInSimulation" in b.reason for b in backoffs)  # replayed with the transaction's gas price
    # Without the backoff every new block would send the same refused refunds again.
    for _ in range(6):
        chain.mine()
        keeper.run_once()
    assert len(transactions_of(chain, KEEPER, deadline_block + 1)) == 1
    keeper.close()
    status = cli("keeper", "status", "--rpc", chain.node.url, "--escrow", chain.escrow.address, "--database", str(db))
    assert status.returncode == 0, status.stderr
    assert "refunds the token refused, backing off: 2 buyers (3 escrows)" in status.stdout
    assert status.stdout.count("OnlyInSimulation") == 2  # the token's own reason, decoded
    # Each wait over: one more transaction, refused again, and the next wait is twice as long.
    keeper = make_keeper(chain, db, tokens=f"{chain.token.address},{hostile.address}", reorg_depth=0)
    keeper.clock = lambda: now
    for n, wait in enumerate((300, 600, 1200), start=2):
        now += wait + 1
        chain.mine()  # the keeper acts on a new block
        keeper.run_once()  # sends
        mined(chain, KEEPER, deadline_block + 1, n)
        keeper.run_once()  # reads the receipt: PayoutFailed again
        assert {b.failures for b in keeper.store.backoffs(chain.escrow.address)} == {n}
        chain.mine()
        keeper.run_once()
        assert len(transactions_of(chain, KEEPER, deadline_block + 1)) == n
    text = generate_latest(keeper.metrics.registry).decode()
    assert 'x402_keeper_payouts_refused_total{stage="mined"} 6.0' in text
    # What the refused payouts cost: within each transaction at most PAYOUT_GAS per buyer, and nothing reverted.
    later = transactions_of(chain, KEEPER, deadline_block + 2)
    assert all(r["status"] == 1 and int(r["gasUsed"]) < 2 * PAYOUT_GAS + 100_000 for r in later)  # type: ignore[call-overload]


def test_a_batch_a_gas_burning_token_reverts_is_split_by_mining_and_the_gas_lost_stays_bounded(
    chain: Chain, tmp_path: Path
) -> None:
    """A batch reverts when mined, and a node that refuses eth_call with fee fields stops the keeper from
    replaying it: the keeper never sends that set again, splits it by token (the honest part goes out in the
    next block), then the hostile part into single entries, whose payouts fail alone and are backed off."""
    burner = chain.deploy_token("GasBurningToken")
    buyers = (BUYER, BUYER2, STRANGER, SELLER2, DEPLOYER)
    for who in buyers:
        burner.mint(chain.deployer, dev(who).address, 10**9)
    hostile = [make_terms(chain, token=burner.address, window=100, buyer=b) for b in buyers]
    honest = [make_terms(chain, window=100, buyer=BUYER if i % 2 else BUYER2) for i in range(4)]
    for terms in hostile + honest:
        deposit(chain, terms)
    chain.mine(max(t.deadline for t in honest))  # the last deposit has the latest deadline
    deadline_block = int(chain.w3.eth.block_number)
    proxy = RpcProxy(chain.node.url)
    proxy.fail_if("eth_call", lambda params: bool(params) and "maxFeePerGas" in params[0], INTERNAL_ERROR)
    try:
        keeper = make_keeper(chain, tmp_path / "k.sqlite", rpc_url=proxy.url,
                             tokens=f"{chain.token.address},{burner.address}", reorg_depth=0)  # fmt: skip
        for _ in range(8):
            keeper.run_once()
        sent = transactions_of(chain, KEEPER, deadline_block + 1)
        for _ in range(4):  # left alone from now on, however many blocks
            chain.mine()
            keeper.run_once()
        assert len(transactions_of(chain, KEEPER, deadline_block + 1)) == len(sent)
    finally:
        proxy.close()
    refunded = refund_blocks(chain)
    assert max(refunded[chain.escrow.id_of(t)] for t in honest) - deadline_block <= 3  # revert, then its parts
    assert all(chain.escrow.state_of(chain.escrow.id_of(t)) is State.HELD for t in hostile)
    # The batch of 9 reverts, and so does the hostile part of 5; each hostile escrow alone fails its payout.
    reverted = [r for r in sent if r["status"] == 0]
    assert len(reverted) == 2
    assert sum(int(r["gasUsed"]) for r in reverted) <= 1_000_000  # type: ignore[call-overload]
    rows = keeper.store.db.all("SELECT ids FROM attempts ORDER BY created_at")
    sets = [fingerprint([r[0][i : i + 32] for i in range(0, len(r[0]), 32)]) for r in rows]
    assert len(sets) == len(set(sets))  # no set of escrows was sent twice
    assert keeper.store.troubles(chain.escrow.address, QUARANTINED) == []  # alone, no refund reverts
    assert {b.buyer for b in keeper.store.backoffs(chain.escrow.address)} == {dev(b).address.lower() for b in buyers}
