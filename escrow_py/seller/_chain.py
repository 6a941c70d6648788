"""The seller's view of the chain: one operator TxSender shared by deposits, refunds and deliveries.

Sharing one sender keeps the operator's nonces in one place (TxSender takes them
under a lock), whichever task or thread sends. Every method blocks on RPC: the
middleware calls them from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence

from web3 import HTTPProvider, Web3
from web3.types import TxReceipt

from escrow_py.chain.authorization import TokenDomain
from escrow_py.chain.clock import next_block_time
from escrow_py.chain.escrow import Escrow
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.seller._config import SellerConfig
from escrow_py.terms import State, Terms
from escrow_py.wire import EscrowPayload


class SellerChain:
    def __init__(self, config: SellerConfig, w3: Web3 | None = None) -> None:
        self.config = config
        self.w3 = w3 or Web3(HTTPProvider(config.rpc_url, request_kwargs={"timeout": config.rpc_timeout}))
        self.escrow = Escrow(self.w3, config.escrow)
        self.token = Token(self.w3, config.token)
        self.sender = TxSender(self.w3, config.operator)
        self.domain = TokenDomain(config.token_name, config.token_version, config.chain_id, self.token.address)

    def now(self) -> int:
        """The chain's clock as the deposit will meet it: the next block's timestamp."""
        return next_block_time(self.w3)

    def state_of(self, escrow_id: bytes) -> State:
        return self.escrow.state_of(escrow_id)

    def deposit(self, payload: EscrowPayload, *, gas: int | None = None) -> TxReceipt:
        return self.escrow.deposit(
            self.sender,
            payload.terms,
            payload.authorization,
            payload.signature,
            gas=gas,
            confirmations=self.config.confirmations,
        )

    def refund(self, terms: Terms) -> TxReceipt:
        return self.escrow.refund(self.sender, terms, confirmations=self.config.confirmations)

    def deliver_many(self, entries: Sequence[tuple[Terms, bytes]]) -> TxReceipt:
        return self.escrow.deliver_many(self.sender, entries, confirmations=self.config.confirmations)
