"""x402-escrow: x402 payments held in escrow until the seller proves delivery.

The shared protocol layer is re-exported here; each role lives in its own package
(`escrow_py.keeper`; the seller middleware and buyer client follow) and the chain
binding in `escrow_py.chain`. Every exception derives from `EscrowError`
(the tree is drawn in `escrow_py.protocol.errors`).

The re-exports are resolved on first use (PEP 562): importing a submodule, as the
`x402-escrow` command does for `--help`, does not pay for the x402 SDK and eth-account.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from escrow_py.protocol.errors import (
        ChainError,
        ConfigError,
        ContractRevert,
        EscrowError,
        ProtocolError,
        RpcError,
        TransactionFailed,
    )
    from escrow_py.protocol.reasons import Reason
    from escrow_py.protocol.terms import TERMS_TYPEHASH, State, Terms, delivery_hash, escrow_id, request_hash
    from escrow_py.protocol.wire import SCHEME

__version__ = "0.1.0"

# Each re-exported name and the module it comes from.
_EXPORTS = {
    "ChainError": "escrow_py.protocol.errors",
    "ConfigError": "escrow_py.protocol.errors",
    "ContractRevert": "escrow_py.protocol.errors",
    "EscrowError": "escrow_py.protocol.errors",
    "ProtocolError": "escrow_py.protocol.errors",
    "RpcError": "escrow_py.protocol.errors",
    "TransactionFailed": "escrow_py.protocol.errors",
    "Reason": "escrow_py.protocol.reasons",
    "TERMS_TYPEHASH": "escrow_py.protocol.terms",
    "State": "escrow_py.protocol.terms",
    "Terms": "escrow_py.protocol.terms",
    "delivery_hash": "escrow_py.protocol.terms",
    "escrow_id": "escrow_py.protocol.terms",
    "request_hash": "escrow_py.protocol.terms",
    "SCHEME": "escrow_py.protocol.wire",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'escrow_py' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


__all__ = [
    "SCHEME",
    "TERMS_TYPEHASH",
    "ChainError",
    "ConfigError",
    "ContractRevert",
    "EscrowError",
    "ProtocolError",
    "Reason",
    "RpcError",
    "State",
    "Terms",
    "TransactionFailed",
    "__version__",
    "delivery_hash",
    "escrow_id",
    "request_hash",
]
