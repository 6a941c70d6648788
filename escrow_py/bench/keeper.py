"""How fast a keeper refunds a crowd: N escrows expiring together, 1-second blocks, one keeper process.

The escrows are deposited by one submitter for one buyer (so the figures compare with
the gas benchmark's refundMany per item, measured in the same run), all with the same
deadline. A real `x402-escrow keeper run` subprocess indexes them before the deadline;
the clock then runs on its own 1-second blocks until every escrow is Refunded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hexbytes import HexBytes

from escrow_py.bench.gas import measure_gas
from escrow_py.chain.anvil import Anvil, dev_private_key, dev_signer
from escrow_py.chain.authorization import authorization_for, sign_authorization
from escrow_py.chain.escrow import Escrow, Refunded, deploy
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.terms import Terms, request_hash

KEEPER_ACCOUNT = 7
DEPOSIT_GAS = 200_000
AMOUNT = 10_000


def _proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds user+system) of a live process, from /proc."""
    peak_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of stat
    return peak_kb / 1024, cpu


def measure_keeper(escrows: int = 1000, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda _msg: None)
    say("reference: the gas benchmark's refundMany per item, same build")
    reference = measure_gas(tokens=("TestUSDC",))["TestUSDC"]["refund_many_per_item_one_buyer"]
    with Anvil(block_time=1, extra_args=["--gas-limit", "60000000"]) as node, tempfile.TemporaryDirectory() as tmp:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        buyer = dev_signer(1)
        submitter = TxSender(w3, dev_signer(2))
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        token.mint(deployer, buyer.address, AMOUNT * escrows * 2)
        start_block = int(w3.eth.block_number)
        domain = token.domain()
        # Time to sign and mine every deposit before the deadline (about 300 deposits fit a block).
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 10 + escrows // 25
        say(f"signing and depositing {escrows} escrows, all with deadline {deadline}")
        sent = []
        for _ in range(escrows):
            terms = Terms(buyer.address, dev_signer(3).address, dev_signer(3).address, token.address, AMOUNT,
                          deadline, request_hash("GET", "http://127.0.0.1/item"), Terms.new_salt())  # fmt: skip
            auth = authorization_for(terms, escrow.address, node.chain_id, 0, deadline)
            sent.append(
                submitter.send(
                    escrow.address, escrow.deposit_data(terms, auth, sign_authorization(buyer, domain, auth)),
                    gas=DEPOSIT_GAS,
                )
            )  # fmt: skip
        for tx in sent:
            submitter.wait(tx.tx_hash, timeout=300)
        say("deposits mined; starting the keeper")
        env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(KEEPER_ACCOUNT)}
        keeper = subprocess.Popen(
            [sys.executable, "-m", "escrow_py.cli", "keeper", "run", "--rpc", node.url, "--escrow", escrow.address,
             "--start-block", str(start_block), "--database", str(Path(tmp) / "keeper.sqlite"),
             "--poll-interval", "0.25", "--batch-size", "250"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            refunded: dict[bytes, Refunded] = {}
            limit = time.monotonic() + 600
            while len(refunded) < escrows:
                if time.monotonic() > limit:
                    raise RuntimeError(f"only {len(refunded)} of {escrows} refunded after 10 minutes")
                if keeper.poll() is not None:
                    raise RuntimeError(f"keeper exited with code {keeper.returncode}")
                for event in escrow.events(start_block, int(w3.eth.block_number)):
                    if isinstance(event, Refunded):
                        refunded[event.id] = event
                time.sleep(0.5)
            peak_mb, cpu_s = _proc_usage(keeper.pid)
        finally:
            keeper.send_signal(signal.SIGTERM)
            keeper.wait(timeout=60)
        deadline_block = next(
            n
            for n in range(start_block, int(w3.eth.block_number) + 1)
            if int(w3.eth.get_block(n)["timestamp"]) >= deadline
        )
        last = max(event.at.block_number for event in refunded.values())
        tx_hashes = {event.at.tx_hash for event in refunded.values()}
        gas = sum(int(w3.eth.get_transaction_receipt(HexBytes(h))["gasUsed"]) for h in tx_hashes)
        return {
            "escrows": escrows,
            "deadline_block": deadline_block,
            "blocks_to_all_refunded": last - deadline_block,
            "seconds_to_all_refunded": int(w3.eth.get_block(last)["timestamp"]) - deadline,
            "refund_transactions": len(tx_hashes),
            "gas_per_refund": gas // escrows,
            "reference_refund_many_per_item": reference,
            "gas_per_refund_vs_reference": round(gas / escrows / reference, 3),
            "keeper_peak_rss_mb": round(peak_mb, 1),
            "keeper_cpu_s": round(cpu_s, 2),
            "targets": {"blocks_to_all_refunded": 5, "gas_per_refund_vs_reference": 1.10},
        }
