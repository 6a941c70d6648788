"""How fast and how cheaply keepers refund a crowd: N escrows of N distinct buyers expiring together.

Set-up, none of it timed: a fresh anvil with 1-second blocks; the escrow, TestUSDC and a
batch minter; N buyer keys, each funded and signing one payment. The keeper processes
(`x402-escrow keeper run`, one or several, each with its own key and database) start
first and index the deposits as they are mined, as a keeper running beside a live
deployment would. The deadline is far ahead when the buyers sign; only once every
deposit is mined and indexed does the chain's clock jump to it (`evm_setNextBlockTimestamp`),
so a slow machine lengthens the set-up, never the measured part.

Measured from the keepers' side (each process's /proc):
- blocks from the deadline's block to the block of the last refund;
- peak RSS of each keeper (VmHWM);
- CPU per refund: the keepers' CPU from ready (imported, checked) until each has indexed every refund,
  over N, so it includes indexing the N deposits and following up its own transactions;
- idle CPU after the burst: CPU seconds per second over the idle window after that (IDLE_WINDOW s; the keeper is
  still following its last transactions to `reorg_depth` then);
- gas: per refund, and the share spent on transactions that refunded nothing (with several keepers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from eth_utils.crypto import keccak
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

from escrow_devtools.anvil import Anvil, dev_private_key, dev_signer, free_port
from escrow_devtools.artifacts import deploy
from escrow_py.chain import rpc
from escrow_py.chain.escrow import REFUNDED_TOPIC, Escrow
from escrow_py.chain.signer import LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.eip3009 import authorization_for, sign_authorization
from escrow_py.protocol.terms import Terms, request_hash

KEEPER_ACCOUNTS = (7, 8, 9)  # anvil dev accounts no other role uses here
DEPOSIT_GAS = 200_000
AMOUNT = 10_000
# Each buyer is minted twice what it pays, so its balance is not empty when the refund arrives: an agent's
# wallet keeps a balance, and a refund into an empty balance slot costs 17,100 gas more (a fresh SSTORE).
FUNDING = 2 * AMOUNT
BLOCK_GAS_LIMIT = 60_000_000
MINT_CHUNK = 400
SEND_CHUNK = 200  # raw deposit transactions per JSON-RPC batch
IDLE_WINDOW = 20.0
TARGETS = {
    "blocks_to_all_refunded": 20,
    "keeper_peak_rss_mb": 150,
    "keeper_cpu_ms_per_refund": 1.0,
    "keeper_idle_cpu_s_per_s": 0.05,
}


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


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _ready(port: int) -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200)
    except (urllib.error.URLError, OSError):
        return False


class _Keepers:
    """The keeper processes, each with its key, database and metrics port."""

    def __init__(self, node_url: str, escrow: str, token: str, *, start_block: int, count: int, workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for n, account in enumerate(KEEPER_ACCOUNTS[:count]):
            port = free_port()
            args = [sys.executable, "-m", "escrow_py.cli", "keeper", "run", "--rpc", node_url, "--escrow", escrow,
                    "--token", token, "--start-block", str(start_block), "--database", str(workdir / f"k{n}.sqlite"),
                    "--poll-interval", "0.25", "--batch-size", "250", "--metrics", f"127.0.0.1:{port}"]  # fmt: skip
            env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(account)}
            with (workdir / f"k{n}.log").open("wb") as log:
                self.procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log))
            self.ports.append(port)
        self.addresses = [dev_signer(a).address for a in KEEPER_ACCOUNTS[:count]]

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a keeper exited with code {proc.returncode} (see its log in the work dir)")

    def wait(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        limit = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > limit:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.25)

    def usage(self) -> list[tuple[float, float]]:
        return [_proc_usage(p.pid) for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class _Chain:
    """The bench's anvil with the contracts deployed and the buyers funded."""

    node: Anvil
    w3: Web3
    escrow: Escrow
    token: Token
    buyers: list[LocalSigner]
    start_block: int


def _submit(w3: Web3, provider: HTTPProvider, sender: TxSender, build: Callable[[int], tuple[str, bytes, int]], *,
            count: int, say: Callable[[str], None]) -> None:  # fmt: skip
    """Sign `count` transactions of one sender (`build(n)`: the n-th's to, data, gas), send them, wait until mined.

    Set-up only, so fixed fees and gas. A node under load has been seen to lose a transaction without a word (never
    mined, not in its pool), leaving every later nonce queued: the sender's mined nonce shows how far the chain
    got, and whatever stalls is sent again, the same bytes.
    """
    max_fee, tip = sender.fees()
    first = int(w3.eth.get_transaction_count(sender.address, "pending"))
    raws = []
    for n in range(count):
        to, data, gas = build(n)
        tx = {"type": 2, "chainId": sender.chain_id, "from": sender.address, "to": to, "data": data, "value": 0,
              "nonce": first + n, "gas": gas, "maxFeePerGas": max_fee * 4, "maxPriorityFeePerGas": tip}  # fmt: skip
        raws.append(sender.signer.sign_transaction(tx))
        if (n + 1) % 2000 == 0:
            say(f"  {n + 1} of {count} signed")

    def send(batch: list[bytes]) -> None:
        for start in range(0, len(batch), SEND_CHUNK):
            requests = [
                (RPCEndpoint("eth_sendRawTransaction"), ["0x" + r.hex()]) for r in batch[start : start + SEND_CHUNK]
            ]
            answers = provider.make_batch_request(requests)
            if not isinstance(answers, list):
                raise RuntimeError(f"the node refused a batch of transactions: {answers.get('error')}")
            for answer in answers:
                message = str(answer.get("error", {}).get("message", "")) if "error" in answer else ""
                if message and "already known" not in message and "nonce too low" not in message:
                    raise RuntimeError(f"a set-up transaction was refused: {answer['error']}")

    send(raws)
    limit, mined, stalled_since = time.monotonic() + 1800, 0, time.monotonic()
    while mined < count:
        time.sleep(1.0)
        now = int(w3.eth.get_transaction_count(sender.address, "latest")) - first
        if now > mined:
            mined, stalled_since = now, time.monotonic()
        elif time.monotonic() - stalled_since > 15:
            say(f"  {count - mined} transactions not mined for 15 s: sending them again")
            send(raws[mined:])
            stalled_since = time.monotonic()
        if time.monotonic() > limit:
            raise RuntimeError(f"only {mined} of {count} set-up transactions mined in 30 minutes")


def _setup(node: Anvil, escrows: int, say: Callable[[str], None]) -> _Chain:
    w3 = node.web3(timeout=120)
    deployer = TxSender(w3, dev_signer(0))
    token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
    escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
    # Deterministic throwaway keys: one distinct buyer per escrow, each funded once.
    buyers = [LocalSigner.from_key(keccak(b"x402-escrow keeper bench buyer %d" % n)) for n in range(escrows)]
    minter = deploy(deployer, "BatchMinter")
    selector = keccak(text="mintEach(address,address[],uint256)")[:4]
    chunks = [[b.address for b in buyers[i : i + MINT_CHUNK]] for i in range(0, len(buyers), MINT_CHUNK)]

    def mint(n: int) -> tuple[str, bytes, int]:
        data = selector + encode(["address", "address[]", "uint256"], [token.address, chunks[n], FUNDING])
        return minter, data, 60_000 + 30_000 * len(chunks[n])

    provider = HTTPProvider(node.url, request_kwargs={"timeout": 120})
    _submit(w3, provider, deployer, mint, count=len(chunks), say=say)
    return _Chain(node, w3, escrow, token, buyers, int(w3.eth.block_number))


def _deposit_all(chain: _Chain, deadline: int, say: Callable[[str], None]) -> None:
    """Sign one payment per buyer and deposit each (set-up only)."""
    escrow, token = chain.escrow, chain.token
    domain = token.domain()
    seller = dev_signer(3).address
    rh = request_hash("GET", "http://127.0.0.1/item")

    def deposit(n: int) -> tuple[str, bytes, int]:
        buyer = chain.buyers[n]
        terms = Terms(
            buyer=buyer.address,
            seller=seller,
            operator=seller,
            token=token.address,
            amount=AMOUNT,
            deadline=deadline,
            request_hash=rh,
            salt=Terms.new_salt(),
        )
        auth = authorization_for(terms, escrow.address, escrow.chain_id, 0, deadline)
        return escrow.address, escrow.deposit_data(terms, auth, sign_authorization(buyer, domain, auth)), DEPOSIT_GAS

    provider = HTTPProvider(chain.node.url, request_kwargs={"timeout": 120})
    _submit(chain.w3, provider, TxSender(chain.w3, dev_signer(2)), deposit, count=len(chain.buyers), say=say)


def _refund_logs(chain: _Chain, first: int, last: int) -> list[dict[str, Any]]:
    query = {"address": chain.escrow.address, "fromBlock": hex(first), "toBlock": hex(last),
             "topics": ["0x" + REFUNDED_TOPIC.hex()]}  # fmt: skip
    logs: list[dict[str, Any]] = rpc.request(chain.w3, "eth_getLogs", [query])
    return logs


def _keeper_receipts(w3: Web3, keepers: Sequence[str], first: int, last: int) -> list[dict[str, Any]]:
    """Receipts of every transaction the keepers sent in blocks first..last."""
    wanted = {k.lower() for k in keepers}
    receipts = []
    for number in range(first, last + 1):
        block = rpc.request(w3, "eth_getBlockByNumber", [hex(number), True])
        for tx in block["transactions"]:
            if str(tx["from"]).lower() in wanted:
                receipts.append(rpc.request(w3, "eth_getTransactionReceipt", [tx["hash"]]))
    return receipts


@dataclass
class _Usage:
    """Each keeper's (peak RSS MiB, CPU s) at the bench's milestones."""

    ready: list[tuple[float, float]]
    indexed: list[tuple[float, float]] = field(default_factory=list)
    refunded: list[tuple[float, float]] = field(default_factory=list)
    idle: list[tuple[float, float]] = field(default_factory=list)

    def cpu(self, since: list[tuple[float, float]], until: list[tuple[float, float]]) -> float:
        return sum(b[1] - a[1] for a, b in zip(since, until, strict=True))


def _burst(
    chain: _Chain, group: _Keepers, deadline: int, idle_window: float, say: Callable[[str], None]
) -> tuple[_Usage, float]:
    """Deposit, wait for the keepers to index, jump to the deadline, wait for every refund, then idle."""
    group.wait(lambda: all(_ready(p) for p in group.ports), "the keepers to start", 120)
    usage = _Usage(ready=group.usage())
    say(f"signing and depositing {len(chain.buyers)} escrows (the deadline is ahead; the clock jumps to it later)")
    _deposit_all(chain, deadline, say)
    held = 'x402_keeper_escrows{state="held"}'
    group.wait(lambda: all(_metrics(p).get(held) == len(chain.buyers) for p in group.ports),
               "the keepers to index every deposit", 1800)  # fmt: skip
    usage.indexed = group.usage()
    say("every deposit indexed; the clock jumps to the deadline")
    rpc.request(chain.w3, "evm_setNextBlockTimestamp", [deadline])
    refunded: set[str] = set()
    scanned = int(chain.w3.eth.block_number)
    started = time.monotonic()

    def all_refunded() -> bool:
        nonlocal scanned
        head = int(chain.w3.eth.block_number)
        if head > scanned:
            refunded.update(entry["topics"][1] for entry in _refund_logs(chain, scanned + 1, head))
            scanned = head
        return len(refunded) == len(chain.buyers)

    group.wait(all_refunded, f"all {len(chain.buyers)} refunds", 1800)
    seconds = time.monotonic() - started
    # The burst is over for a keeper once it has indexed every refund (its own and the others'): until then
    # it is still reading receipts and Refunded logs, work of the burst, not idling.
    done = 'x402_keeper_escrows{state="refunded"}'
    group.wait(lambda: all(_metrics(p).get(done) == len(chain.buyers) for p in group.ports),
               "the keepers to index every refund", 600)  # fmt: skip
    usage.refunded = group.usage()
    say(f"all refunded; measuring idle CPU for {idle_window:.0f}s")
    time.sleep(idle_window)
    group.check_alive()
    usage.idle = group.usage()
    return usage, seconds


def measure_keeper(
    escrows: int = 1000,
    keepers: int = 1,
    progress: Callable[[str], None] | None = None,
    idle_window: float = IDLE_WINDOW,
) -> dict[str, Any]:
    """Refund `escrows` expiring together with `keepers` racing; idle CPU over `idle_window` seconds after."""
    if not 1 <= keepers <= len(KEEPER_ACCOUNTS):
        raise ValueError(f"keepers must be 1 to {len(KEEPER_ACCOUNTS)}, got {keepers}")
    if idle_window <= 0:
        raise ValueError(f"idle_window must be above 0 seconds, got {idle_window}")
    say = progress or (lambda _msg: None)
    with Anvil(block_time=1, extra_args=["--gas-limit", str(BLOCK_GAS_LIMIT)]) as node, \
            tempfile.TemporaryDirectory() as tmp:  # fmt: skip
        say(f"funding {escrows} distinct buyers")
        chain = _setup(node, escrows, say)
        w3 = chain.w3
        group = _Keepers(node.url, chain.escrow.address, chain.token.address, start_block=chain.start_block,
                         count=keepers, workdir=Path(tmp))  # fmt: skip
        # Far ahead: the buyers sign it now, the clock jumps to it once every deposit is indexed.
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 7 * 24 * 3600
        try:
            usage, seconds = _burst(chain, group, deadline, idle_window, say)
        finally:
            group.stop()
        head = int(w3.eth.block_number)
        deadline_block = next(n for n in range(chain.start_block, head + 1)
                              if int(w3.eth.get_block(n)["timestamp"]) >= deadline)  # fmt: skip
        logs = _refund_logs(chain, deadline_block, head)
        ids = [entry["topics"][1] for entry in logs]
        if len(ids) != escrows or len(set(ids)) != escrows:
            raise RuntimeError(f"{len(set(ids))} escrows refunded in {len(ids)} Refunded events, expected {escrows}")
        last = max(int(entry["blockNumber"], 16) for entry in logs)
        receipts = _keeper_receipts(w3, group.addresses, deadline_block, head)
        gas = sum(int(r["gasUsed"], 16) for r in receipts)
        topic = "0x" + REFUNDED_TOPIC.hex()
        # Wasted: a transaction that reverted, or refunded nothing because another keeper got there first.
        wasted = sum(int(r["gasUsed"], 16) for r in receipts
                     if int(r["status"], 16) == 0 or all(e["topics"][0] != topic for e in r["logs"]))  # fmt: skip
        idle = max(b[1] - a[1] for a, b in zip(usage.refunded, usage.idle, strict=True)) / idle_window
        return {
            "escrows": escrows,
            "keepers": keepers,
            "distinct_buyers": len({b.address for b in chain.buyers}),
            "deadline_block": deadline_block,
            "blocks_to_all_refunded": last - deadline_block,
            "seconds_to_all_refunded": int(w3.eth.get_block(last)["timestamp"]) - deadline,
            "wall_seconds_to_all_refunded": round(seconds, 1),
            "refund_transactions": len({entry["transactionHash"] for entry in logs}),
            "keeper_transactions": len(receipts),
            "gas_per_refund": gas // escrows,
            "wasted_gas_fraction": round(wasted / gas, 3) if gas else 0.0,
            "keeper_peak_rss_mb": round(max(u[0] for u in usage.idle), 1),
            "keeper_cpu_ms_per_refund": round(1000 * usage.cpu(usage.ready, usage.refunded) / escrows, 3),
            "keeper_cpu_s_indexing": round(usage.cpu(usage.ready, usage.indexed), 2),
            "keeper_cpu_s_refunding": round(usage.cpu(usage.indexed, usage.refunded), 2),
            "keeper_idle_cpu_s_per_s": round(idle, 4),
            "targets": TARGETS,
        }
