"""Integration on loopback: uvicorn serving the seller app, buyers as clients or real processes, the session anvil.

`Books` is the promise every test ends on: the sum of token balances is unchanged
and the escrow holds exactly the sum of the Held amounts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address, dev

from escrow_devtools import harness
from escrow_devtools.anvil import dev_private_key
from escrow_devtools.demo._shop import build_shop, routes
from escrow_py.buyer import EscrowClient, PaymentNotDelivered
from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.terms import State
from escrow_py.seller import SellerConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class Books:
    """Token balances of every dev account and the escrow, taken now; `check()` after every step."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.accounts = [address(i) for i in range(10)] + [chain.escrow.address]
        self.before = self.balances()

    def balances(self, block: int | None = None) -> dict[str, int]:
        at = int(self.chain.w3.eth.block_number) if block is None else block
        return {a: self.chain.token.balance_of(a, at) for a in self.accounts}

    def held(self, block: int) -> int:
        events = self.chain.escrow.events(0, block)
        return sum(
            e.terms.amount
            for e in events
            if isinstance(e, Deposited)
            and e.terms.token == self.chain.token.address
            and self.chain.escrow.state_of(e.id, block) is State.HELD
        )

    def check(self) -> None:
        """At one block (the poster may be delivering meanwhile): conservation, and escrow == sum of Held."""
        block = int(self.chain.w3.eth.block_number)
        after = self.balances(block)
        assert sum(after.values()) == sum(self.before.values()), "tokens appeared or vanished"
        assert after[self.chain.escrow.address] == self.held(block), "the escrow does not hold exactly what is Held"


def seller_config(chain: Chain, store: Path, **overrides: Any) -> SellerConfig:
    settings: dict[str, Any] = {
        "rpc_url": chain.node.url,
        "escrow": chain.escrow.address,
        "token": chain.token.address,
        "network": "eip155:84532",
        "pay_to": address(SELLER),
        "operator": dev(OPERATOR),
        "routes": routes(),
        "store": store,
        "poster_interval": 0.1,
    }
    settings.update(overrides)
    return SellerConfig(**settings)


@contextmanager
def serving(chain: Chain, store: Path, *, work_seconds: float = 0.0, **overrides: Any) -> Iterator[str]:
    """The demo shop (report, fail, stuck) behind the middleware, on uvicorn on 127.0.0.1; yields its base URL."""
    app = build_shop(seller_config(chain, store, **overrides), work_seconds=work_seconds)
    with harness.serving(app, startup_timeout=15) as running:
        yield running.url


class SellerProcess:
    """tests/integration/seller_process.py as a real process, the operator's key in its environment."""

    def __init__(self, chain: Chain, store: Path, port: int, *flags: str) -> None:
        command = [
            sys.executable, str(HERE / "seller_process.py"),
            "--rpc", chain.node.url, "--escrow", chain.escrow.address, "--token", chain.token.address,
            "--pay-to", address(SELLER), "--store", str(store), "--port", str(port), *flags,
        ]  # fmt: skip
        env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(OPERATOR)}
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        harness.wait_until_answering(
            f"{self.url}/report/ping",
            ready=lambda answer: answer.status_code == 402,
            process=self.process,
            output=self.output,
            timeout=30,
            what="the seller process",
        )

    def output(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()  # its pipe, left open, is a ResourceWarning (an error in this suite)


def buy_from_a_seller_that_dies(chain: Chain, store: Path, journal: Path, port: int, *flags: str) -> bytes:
    """Start seller_process.py with --die-after-handler (and `flags`), buy /report/crash from it as BUYER,
    and see the seller SIGKILL itself after storing its answer: the escrow id the buyer lost the answer to."""
    seller = SellerProcess(chain, store, port, *flags, "--die-after-handler")
    try:
        with EscrowClient(dev(BUYER), chain.node.url, journal) as client, pytest.raises(PaymentNotDelivered) as lost:
            client.get(f"{seller.url}/report/crash")
        assert seller.process.wait(10) == -signal.SIGKILL
    finally:
        seller.stop()
    escrow_id = lost.value.escrow_id
    assert escrow_id is not None
    return escrow_id
