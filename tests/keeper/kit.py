"""Helpers shared by the keeper tests: keepers on the session chain, keeper processes, chain facts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import dev
from hexbytes import HexBytes

from escrow_devtools.anvil import dev_private_key
from escrow_py.chain.escrow import Refunded
from escrow_py.keeper import Keeper, KeeperConfig

if TYPE_CHECKING:
    from fixtures.chain import Chain

KEEPER = 7  # anvil dev accounts no other role uses
KEEPER2 = 8
KEEPER3 = 9


def make_keeper(
    chain: Chain, db: Path | str, *, who: int = KEEPER, rpc_url: str | None = None, **settings: object
) -> Keeper:
    """A keeper on the session chain refunding its TestUSDC (and whatever `tokens` adds)."""
    flags: dict[str, object] = {"rpc_url": rpc_url or chain.node.url, "escrows": chain.escrow.address,
                                "database": str(db), "tokens": chain.token.address}  # fmt: skip
    flags.update(settings)
    return Keeper(KeeperConfig.load(flags), dev(who))


def refunds_by_id(chain: Chain) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for event in chain.escrow.events(0, int(chain.w3.eth.block_number)):
        if isinstance(event, Refunded):
            counts[event.id] = counts.get(event.id, 0) + 1
    return counts


def refund_blocks(chain: Chain) -> dict[bytes, int]:
    """The block each escrow was refunded in."""
    return {
        e.id: e.at.block_number
        for e in chain.escrow.events(0, int(chain.w3.eth.block_number))
        if isinstance(e, Refunded)
    }


def transactions_of(chain: Chain, who: int, since: int = 0) -> list[dict[str, object]]:
    """Receipts of every transaction `who` sent in blocks since `since` (the chain fixture is tiny)."""
    sender = dev(who).address
    out = []
    for number in range(since, int(chain.w3.eth.block_number) + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            assert isinstance(tx, Mapping)  # full transactions, not hashes
            if tx["from"] == sender:
                out.append(dict(chain.w3.eth.get_transaction_receipt(HexBytes(tx["hash"]))))
    return out


def mined(chain: Chain, who: int, since: int, count: int, timeout: float = 30.0) -> None:
    """Wait until `who` has `count` transactions mined since block `since`.

    Anvil's automine mines a transaction just after eth_sendRawTransaction answers, not before: on a loaded
    machine a receipt read at once may not be there yet, and a test must not take that for the keeper's doing.
    """
    wait_until(lambda: len(transactions_of(chain, who, since)) >= count, f"{count} transactions mined", timeout)
    assert len(transactions_of(chain, who, since)) == count


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(poll)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return bytes(response.read()).decode()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample (or the sum of a labelled family) in Prometheus text."""
    values = [float(m[1]) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    return sum(values)


def readyz(port: int) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "escrow_py.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)  # fmt: skip


def keeper_env(who: int = KEEPER) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("X402_")},
            "X402_ESCROW_PRIVATE_KEY": dev_private_key(who)}  # fmt: skip


def start_keeper(chain: Chain, db: Path, *args: str, who: int = KEEPER, rpc_url: str | None = None,
                 stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:  # fmt: skip
    """`x402-escrow keeper run` as its own process, refunding the session chain's TestUSDC."""
    return subprocess.Popen(
        [sys.executable, "-m", "escrow_py.cli", "keeper", "run", "--rpc", rpc_url or chain.node.url, "--escrow",
         chain.escrow.address, "--token", chain.token.address, "--database", str(db), *args],
        env=keeper_env(who), stdout=subprocess.DEVNULL, stderr=stderr, text=True,
    )  # fmt: skip
