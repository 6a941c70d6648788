"""Shared fixtures: one real anvil chain per test session (chain id 84532), reset between tests.

Every test gets the chain as it was after the shared deployments, through
evm_snapshot / evm_revert, so tests are independent and fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pg_server import PostgresServer
from web3 import Web3

from escrow_py.chain.anvil import Anvil, dev_signer
from escrow_py.chain.escrow import Escrow, deploy
from escrow_py.chain.signer import LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender

# anvil dev accounts by role (their keys are anvil's public development keys).
DEPLOYER, BUYER, SELLER, OPERATOR, STRANGER, BUYER2, SELLER2 = range(7)

INITIAL_BALANCE = 1_000_000 * 10**6  # one million test USDC per buyer


@dataclass
class Chain:
    """The session's chain with the escrow and a USDC-like token deployed and buyers funded."""

    node: Anvil
    w3: Web3
    escrow: Escrow
    token: Token
    deployer: TxSender

    def signer(self, index: int) -> LocalSigner:
        return dev_signer(index)

    def sender(self, index: int) -> TxSender:
        return TxSender(self.w3, dev_signer(index))

    def now(self) -> int:
        """The latest block's timestamp: the chain's clock."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def set_next_timestamp(self, timestamp: int) -> None:
        self.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])  # type: ignore[arg-type]

    def mine(self, timestamp: int | None = None) -> None:
        if timestamp is not None:
            self.set_next_timestamp(timestamp)
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def deploy_token(self, contract: str = "TestUSDC", *args: object) -> Token:
        if contract == "TestUSDC" and not args:
            args = ("USDC", "2")
        token = Token(self.w3, deploy(self.deployer, contract, *args))
        for who in (BUYER, BUYER2):
            token.mint(self.deployer, dev_signer(who).address, INITIAL_BALANCE)
        return token


@pytest.fixture(scope="session")
def _session_chain() -> Iterator[Chain]:
    with Anvil() as node:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(DEPLOYER))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        chain = Chain(node=node, w3=w3, escrow=escrow, token=None, deployer=deployer)  # type: ignore[arg-type]
        chain.token = chain.deploy_token()
        yield chain


@pytest.fixture
def chain(_session_chain: Chain) -> Iterator[Chain]:
    """The shared chain, rolled back to its post-deployment state after the test."""
    w3 = _session_chain.w3
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    try:
        yield _session_chain
    finally:
        w3.provider.make_request("evm_revert", [snapshot])  # type: ignore[arg-type]
        # Senders cache nonces; the revert rewinds them on chain.
        _session_chain.deployer = TxSender(w3, dev_signer(DEPLOYER))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL 15 server for the session (tests/pg_server.py), stopped at the end."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on each engine in turn: a new SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.fresh()
