"""The seller's view of the chain: one operator TxSender shared by deposits, refunds and deliveries.

Sharing one sender keeps the operator's nonces in one place, whichever task or
thread sends; with the seller store as its NonceBook, that place is the database,
shared by every process and replica on the store. Every method blocks on RPC: the
middleware calls them from worker threads. Each RPC call ends within
`config.rpc_timeout` seconds (rpc.connect), and each transaction is confirmed, repriced
or given up within `config.tx_timeout` (TxSender.confirm).
"""

from __future__ import annotations

from collections.abc import Sequence

from web3 import Web3
from web3.types import TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.clock import next_block_time
from escrow_py.chain.escrow import Escrow, Settlement
from escrow_py.chain.token import Token
from escrow_py.chain.tx import NonceBook, OnSigned, TxSender
from escrow_py.protocol.eip3009 import TokenDomain
from escrow_py.protocol.terms import State, Terms
from escrow_py.protocol.wire import EscrowPayload
from escrow_py.seller._config import SellerConfig


class SellerChain:
    def __init__(self, config: SellerConfig, w3: Web3 | None = None, *, book: NonceBook | None = None) -> None:
        self.config = config
        self.w3 = w3 or rpc.connect(config.rpc_url, deadline=config.rpc_timeout)
        self.escrow = Escrow(self.w3, config.escrow)
        self.token = Token(self.w3, config.token)
        # With the store as book, every process and replica on one store shares the key's nonces.
        self.sender = TxSender(self.w3, config.operator, watch=True, book=book)
        self.domain = TokenDomain(config.token_name, config.token_version, config.chain_id, self.token.address)

    def now(self) -> int:
        """The chain's clock as the deposit will meet it: the next block's timestamp."""
        return next_block_time(self.w3)

    def state_of(self, escrow_id: bytes, *, block: str | int = "latest") -> State:
        return self.escrow.state_of(escrow_id, block=block)

    def block_time(self, number: int) -> int:
        """The timestamp of block `number`: the clock a transaction mined in it was judged by."""
        return int(str(rpc.request(self.w3, "eth_getBlockByNumber", [hex(number), False])["timestamp"]), 16)

    def _transact(self, data: bytes, *, gas: int | None = None, on_signed: OnSigned | None = None) -> TxReceipt:
        config = self.config
        return self.sender.transact(
            self.escrow.address,
            data,
            gas=gas,
            confirmations=config.confirmations,
            timeout=config.tx_timeout,
            reprice_after=config.reprice_after,
            on_signed=on_signed,
        )

    def deposit(
        self, payload: EscrowPayload, *, gas: int | None = None, on_signed: OnSigned | None = None
    ) -> TxReceipt:
        """Send the deposit and wait for it; `on_signed` records each signed version before it leaves."""
        data = self.escrow.deposit_data(payload.terms, payload.authorization, payload.signature)
        return self._transact(data, gas=gas, on_signed=on_signed)

    def resume(self, tx_hash: bytes) -> TxReceipt | None:
        """Wait again for a transaction sent earlier (a deposit that was not confirmed in time).

        None when the node no longer knows it and it was never mined: it can be sent anew.
        TransactionTimeout if it is still pending after `tx_timeout`.
        """
        if self.sender.receipt(tx_hash) is None and not self.sender.known_to_node(tx_hash):
            return None
        sent = self.sender.followed(tx_hash)
        config = self.config
        if sent is None:  # sent by an earlier process: no signed copy to reprice, wait for it as it is
            return self.sender.wait(tx_hash, confirmations=config.confirmations, timeout=config.tx_timeout)
        return self.sender.confirm(
            sent, confirmations=config.confirmations, timeout=config.tx_timeout, reprice_after=config.reprice_after
        )

    def refund(self, terms: Terms) -> TxReceipt:
        return self._transact(self.escrow.refund_data(terms))

    def deliver_many(self, entries: Sequence[tuple[Terms, bytes]]) -> TxReceipt:
        return self._transact(self.escrow.deliver_many_data(entries))

    def settle_many(self, entries: Sequence[Settlement]) -> TxReceipt:
        """One settleMany of serve-first payments (the contract pays each seller once for the batch)."""
        return self._transact(self.escrow.settle_many_data(entries))

    def authorization_used(self, buyer: str, escrow_id: bytes) -> bool:
        """The token's ERC-3009 state of the buyer's authorization (nonce = escrow id): spent or cancelled."""
        return self.token.authorization_state(buyer, escrow_id)
