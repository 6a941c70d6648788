"""Every exception the package raises, in one tree.

    EscrowError                      anything raised on purpose by escrow_py
    ├── ConfigError                  bad settings; the message says what to fix (also a ValueError)
    │   └── KeyLoadError             a key could not be loaded, never quoting it (escrow_py.chain.signer)
    ├── ChainError                   the chain or the RPC said no
    │   ├── RpcError                 the node could not be reached or answered garbage
    │   │   ├── NodeError            the node answered a JSON-RPC error object; `.revert_data` (chain.rpc)
    │   │   ├── RpcTimeout           no answer within the call's total deadline (also a TimeoutError)
    │   │   ├── InsufficientFunds    the sending key cannot pay for gas; `.address`
    │   │   └── NonceConflict        the key's nonce was taken elsewhere, even after a resync; `.address`
    │   ├── ContractRevert           a call or simulation reverted; `.name` and `.args` of the custom error
    │   ├── TransactionFailed        a mined transaction has status 0; `.tx_hash`
    │   └── TransactionTimeout       sent but not confirmed in time; `.tx_hashes` (also a TimeoutError)
    ├── ProtocolError                a message does not follow the x402 delivery-escrow wire format;
    │   │                            `.reason` is a Reason (also a ValueError)
    │   └── Refusal                  the seller refuses a payment: a rule broken, `.status` 400 or 402
    │                                (escrow_py.seller)
    ├── SellerUnavailable            the seller's own side cannot take a payment now: 503 with
    │                                Retry-After, `.reason` and `.retry_after` (escrow_py.seller)
    ├── FacilitatorDown              the seller's facilitator did not answer or failed (escrow_py.seller)
    ├── FacilitatorError             the facilitator service refuses, with an HTTP status (escrow_py.facilitator)
    ├── IdempotencyConflict          a facilitator idempotency key reused with another body (422) or still
    │                                running (409)
    ├── PaymentError                 a paid request did not end in a verified delivery, saying what
    │                                happened to the money (escrow_py.buyer draws this subtree:
    │                                PaymentRefused, its ChainUnavailable also a ChainError,
    │                                PaymentRejected, PaymentNotDelivered, DeliveryMismatch, ...)
    ├── ToolError                    a paid MCP tool's own failure; the buyer is refunded (escrow_py.mcp)
    └── BuildError                   the contracts did not compile (escrow_devtools.build; also a RuntimeError)

ConfigError, ChainError, ProtocolError and their children without a module in parentheses live
here; the others are defined next to the code that raises them and re-exported by their role's
package. tests/test_errors.py checks that every exception class of the package is in this tree.
"""

from __future__ import annotations

from typing import Any

from escrow_py.protocol.reasons import Reason


class EscrowError(Exception):
    """Base of every exception raised on purpose by escrow_py."""


class ConfigError(EscrowError, ValueError):
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
    """A message does not follow the wire format; `reason` is machine-readable: a Reason, or the reason
    another party gave (a seller's hook, a remote facilitator), passed on as it came."""

    def __init__(self, reason: Reason | str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def _render(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
