"""Every exception the package raises, in one tree.

    EscrowError                      anything raised on purpose by escrow_py
    ├── ConfigError                  bad settings; the message says what to fix
    │   └── KeyLoadError             a key could not be loaded, never quoting it (escrow_py.chain.signer)
    ├── ChainError                   the chain or the RPC said no
    │   ├── RpcError                 the node could not be reached or answered garbage
    │   │   ├── RpcTimeout           no answer within the call's total deadline (also a TimeoutError)
    │   │   ├── InsufficientFunds    the sending key cannot pay for gas; `.address`
    │   │   └── NonceConflict        the key's nonce was taken elsewhere, even after a resync; `.address`
    │   ├── ContractRevert           a call or simulation reverted; `.name` and `.args` of the custom error
    │   ├── TransactionFailed        a mined transaction has status 0; `.tx_hash`
    │   └── TransactionTimeout       sent but not confirmed in time; `.tx_hashes` (one may still be mined)
    └── ProtocolError                a message does not follow the x402 delivery-escrow wire format (also a ValueError);
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


class RpcTimeout(RpcError, TimeoutError):
    """The node accepted the connection (or not) but gave no answer within the call's deadline."""


class InsufficientFunds(RpcError):
    """The node refused a transaction because its sender cannot pay for the gas."""

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        super().__init__(f"{address} cannot pay for gas: {message}")


class NonceConflict(RpcError):
    """The key's nonce was used or taken by another transaction (the key is shared), even after a resync."""

    def __init__(self, address: str, message: str) -> None:
        self.address = address
        super().__init__(f"nonce conflict for {address}: {message}")


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
        self.reason = message  # the decoded revert, e.g. "RecipientBlocked(to=0x...)"
        super().__init__(f"transaction 0x{tx_hash.hex()} failed: {message}")


class TransactionTimeout(ChainError, TimeoutError):
    """Sent, but not confirmed within the time allowed; one of `tx_hashes` (the original and its
    repriced replacements, same nonce) may still be mined."""

    def __init__(self, tx_hashes: list[bytes], nonce: int, timeout: float) -> None:
        self.tx_hashes = tx_hashes
        self.nonce = nonce
        shown = ", ".join("0x" + h.hex() for h in tx_hashes)
        super().__init__(f"transaction with nonce {nonce} not confirmed within {timeout:g}s ({shown})")


class ProtocolError(EscrowError, ValueError):
    """A message does not follow the wire format; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
