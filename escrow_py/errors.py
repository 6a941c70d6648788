"""Every exception the package raises, in one tree.

    EscrowError                      anything raised on purpose by escrow_py
    ├── ConfigError                  bad settings; the message says what to fix
    │   └── KeyLoadError             a key could not be loaded, never quoting it (escrow_py.chain.signer)
    ├── ChainError                   the chain or the RPC said no
    │   ├── RpcError                 the node could not be reached or answered garbage
    │   ├── ContractRevert           a call or simulation reverted; `.name` and `.args` of the custom error
    │   └── TransactionFailed        a mined transaction has status 0; `.tx_hash`
    └── ProtocolError                a message does not follow the x402 delivery-escrow wire format;
                                     `.reason` is the machine-readable reason

Roles add their own subclasses below these (the buyer's payment errors say
what happened to the money); each is listed in that role's module docstring.
"""

from __future__ import annotations

from typing import Any


class EscrowError(Exception):
    """Base of every exception raised on purpose by escrow_py."""


class ConfigError(EscrowError):
    """Settings are invalid; the message names the setting and what to fix."""


class ChainError(EscrowError):
    """The chain or the RPC refused or failed."""


class RpcError(ChainError):
    """The node could not be reached, timed out, or answered something unusable."""


class ContractRevert(ChainError):
    """A call, simulation or transaction reverted with a known custom error (or an unknown one).

    `name` is the Solidity error name (e.g. "DeadlinePassed"), `args` its decoded
    values by parameter name, `data` the raw revert data.
    """

    def __init__(self, name: str, args: dict[str, Any], data: bytes = b"") -> None:
        self.name = name
        self.args_by_name = args
        self.data = data
        rendered = ", ".join(f"{k}={_render(v)}" for k, v in args.items())
        super().__init__(f"{name}({rendered})")


class TransactionFailed(ChainError):
    """A transaction was mined with status 0."""

    def __init__(self, tx_hash: bytes, message: str) -> None:
        self.tx_hash = tx_hash
        super().__init__(f"transaction 0x{tx_hash.hex()} failed: {message}")


class ProtocolError(EscrowError):
    """A message does not follow the wire format; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
