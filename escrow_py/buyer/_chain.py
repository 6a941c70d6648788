"""What the buyer keeps of the chain beyond the shared port (escrow_py.chain.port.EscrowChain): the
wall-clock slack of a log search, and the public `delivered_hash` helper on an existing web3 connection.

Every step reaches the chain through `PaymentCore.chain`, one EscrowChain (Web3EscrowChain from
connect_chain, or the settings' own, e.g. the unit tests' in-memory chain).
"""

from __future__ import annotations

from web3 import Web3

from escrow_py.chain.web3chain import Web3EscrowChain

# Wall clock (journal) against chain clock (blocks): how far apart they may be when bounding a log search.
CLOCK_SKEW = 3600


def delivered_hash(
    w3: Web3, escrow: str, escrow_id: bytes, *, since: int = 0, tx_hash: bytes | None = None
) -> bytes | None:
    """The delivery hash the seller posted on chain for `escrow_id` (its Delivered event), if any.

    `tx_hash`, the seller's pointer to its deliverMany, is checked first (one receipt);
    otherwise the logs are searched from chain time `since` on, in chunks a public RPC accepts.
    (EscrowChain.delivered_hash on a chain behind an existing web3 connection.)
    """
    return Web3EscrowChain(w3).delivered_hash(escrow_id, escrow=escrow, since=since, tx_hash=tx_hash)
