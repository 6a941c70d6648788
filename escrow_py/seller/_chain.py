"""The seller's chain: the one EscrowChain, built from its SellerConfig.

One operator sender is shared by deposits, refunds and deliveries, which keeps the
operator's nonces in one place whichever task or thread sends; with the seller store as
its NonceBook, that place is the database, shared by every process and replica on the
store. Every method blocks on RPC: the middleware calls them from worker threads. Each
RPC call ends within `config.rpc_timeout` seconds, and each transaction is confirmed,
repriced or given up within `config.tx_timeout`.
"""

from __future__ import annotations

from web3 import Web3

from escrow_py.chain.tx import NonceBook
from escrow_py.chain.web3chain import Web3EscrowChain, connect_chain
from escrow_py.seller._config import SellerConfig


def seller_chain(config: SellerConfig, w3: Web3 | None = None, *, book: NonceBook | None = None) -> Web3EscrowChain:
    """The chain behind `config.rpc_url`, for `config.escrow`, sending from `config.operator` (nonces in
    `book`: the seller store, so every process and replica on one store shares the key's nonces)."""
    return connect_chain(
        config.rpc_url,
        deadline=config.rpc_timeout,
        escrow=config.escrow,
        signer=config.operator,
        book=book,
        watch=True,
        confirmations=config.confirmations,
        tx_timeout=config.tx_timeout,
        reprice_after=config.reprice_after,
        w3=w3,
    )
