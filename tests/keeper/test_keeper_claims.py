"""Keepers sharing one database split the due escrows by claiming them, and never send one refund twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from web3 import Web3

from escrow_devtools.anvil import Anvil, dev_private_key, dev_signer
from escrow_devtools.bench.keeper import BLOCK_GAS_LIMIT, KEEPER_ACCOUNTS, _deposit_all, _setup
from escrow_py.chain.escrow import Refunded
from escrow_py.keeper._store import KeeperStore

ESCROWS = 1_000


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


@pytest.mark.slow
@pytest.mark.timeout(900)  # 1,000 deposits before the keepers start: minutes on a shared two-core machine
def test_three_keepers_on_one_database_refund_each_of_1000_escrows_exactly_once(db_url: str, tmp_path: Path) -> None:
    with Anvil(block_time=1, extra_args=["--gas-limit", str(BLOCK_GAS_LIMIT)]) as node:
        chain = _setup(node, ESCROWS, lambda _: None)
        w3: Web3 = chain.w3
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600  # set-up is slow on a loaded machine
        _deposit_all(chain, deadline, lambda _: None)
        KeeperStore(db_url).close()  # migrated once up front: the keepers start on one schema
        procs = []
        for n, account in enumerate(KEEPER_ACCOUNTS):
            args = [sys.executable, "-m", "escrow_py.cli", "keeper", "run", "--rpc", node.url, "--escrow",
                    chain.escrow.address, "--token", chain.token.address, "--start-block", str(chain.start_block),
                    "--database", db_url, "--poll-interval", "0.2", "--batch-size", "40"]  # fmt: skip
            env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(account)}
            with (tmp_path / f"k{n}.log").open("wb") as log:
                procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log))
        try:
            node.web3().provider.make_request("evm_setNextBlockTimestamp", [deadline + 1])  # type: ignore[arg-type]
            limit = time.monotonic() + 300
            refunded: Counter[bytes] = Counter()
            # Each poll reads only the blocks mined since the last one: reading every event again each second
            # (the 1,000 deposits included) cost more CPU than the rest of the test.
            unread = chain.start_block
            while sum(refunded.values()) < ESCROWS:
                assert time.monotonic() < limit, f"only {len(refunded)} of {ESCROWS} refunded in 300 s"
                assert all(p.poll() is None for p in procs), (tmp_path / "k0.log").read_text()[-2000:]
                time.sleep(1.0)
                head = int(w3.eth.block_number)
                if head >= unread:
                    refunded.update(e.id for e in chain.escrow.events(unread, head) if isinstance(e, Refunded))
                    unread = head + 1
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)
        assert len(refunded) == ESCROWS and set(refunded.values()) == {1}
        # Not once on chain only (refundMany skips what is settled): sent once. Each escrow is in the transactions
        # of one nonce of one keeper (a fee-bumped replacement keeps the nonce), and every keeper transaction mined
        # refunded something.
        store = KeeperStore(db_url)
        rows = store.db.all("SELECT signer, nonce, ids, refunded FROM attempts")
        sends: dict[bytes, set[tuple[str, int]]] = {}
        for signer, nonce, ids, _ in rows:
            for escrow_id in _split(bytes(ids)):
                sends.setdefault(escrow_id, set()).add((signer, int(nonce)))
        assert len(sends) == ESCROWS
        twice = {i.hex(): s for i, s in sends.items() if len(s) > 1}
        assert twice == {}, f"{len(twice)} escrows sent by more than one transaction"
        keepers = [dev_signer(a).address for a in KEEPER_ACCOUNTS]
        receipts = []
        for number in range(chain.start_block, int(w3.eth.block_number) + 1):
            for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
                assert not isinstance(tx, bytes)  # full transactions, not hashes
                if tx["from"] in keepers:
                    receipts.append(w3.eth.get_transaction_receipt(tx["hash"]))
        assert all(r["status"] == 1 and len(r["logs"]) > 0 for r in receipts)
        by_keeper = Counter(str(signer) for signer, _, ids, _ in rows for _ in _split(bytes(ids)))
        print(f"refunds per keeper: {dict(by_keeper)}; {len(receipts)} transactions")
        store.close()
