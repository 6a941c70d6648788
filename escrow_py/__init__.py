"""x402-escrow: x402 payments held in escrow until the seller proves delivery.

The shared protocol layer is re-exported here; each role lives in its own package
(`escrow_py.keeper`; the seller middleware and buyer client follow) and the chain
binding in `escrow_py.chain`. Every exception derives from `EscrowError`
(the tree is drawn in `escrow_py.errors`).

The re-exports are resolved on first use (PEP 562): importing a submodule, as the
`x402-escrow` command does for `--help`, does not pay for the x402 SDK and eth-account.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each re-exported name and the module it comes from.
_EXPORTS = {
    "ChainError": "escrow_py.errors",
    "ConfigError": "escrow_py.errors",
    "ContractRevert": "escrow_py.errors",
    "EscrowError": "escrow_py.errors",
    "ProtocolError": "escrow_py.errors",
    "RpcError": "escrow_py.errors",
    "TransactionFailed": "escrow_py.errors",
    "TERMS_TYPEHASH": "escrow_py.terms",
    "State": "escrow_py.terms",
    "Terms": "escrow_py.terms",
    "delivery_hash": "escrow_py.terms",
    "escrow_id": "escrow_py.terms",
    "request_hash": "escrow_py.terms",
    "SCHEME": "escrow_py.wire",
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
    "RpcError",
    "State",
    "Terms",
    "TransactionFailed",
    "__version__",
    "delivery_hash",
    "escrow_id",
    "request_hash",
]
