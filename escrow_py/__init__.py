"""x402-escrow: x402 payments held in escrow until the seller proves delivery.

The shared protocol layer is re-exported here; each role lives in its own package
(`escrow_py.keeper`; the seller middleware and buyer client follow) and the chain
binding in `escrow_py.chain`. Every exception derives from `EscrowError`
(the tree is drawn in `escrow_py.errors`).
"""

from escrow_py.errors import (
    ChainError,
    ConfigError,
    ContractRevert,
    EscrowError,
    ProtocolError,
    RpcError,
    TransactionFailed,
)
from escrow_py.terms import TERMS_TYPEHASH, State, Terms, delivery_hash, escrow_id, request_hash
from escrow_py.wire import SCHEME

__version__ = "0.1.0"

__all__ = [
    "SCHEME",
    "TERMS_TYPEHASH",
    "ChainError",
    "ConfigError",
    "ContractRevert",
    "EscrowError",
    "ProtocolError",
    "RpcError",
    "State",
    "Terms",
    "TransactionFailed",
    "__version__",
    "delivery_hash",
    "escrow_id",
    "request_hash",
]
