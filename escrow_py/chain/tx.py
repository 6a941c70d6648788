"""Sending transactions from one key: nonces, EIP-1559 fees, replacement, receipts, revert reasons.

Every role that writes to the chain (the seller depositing and delivering, the
keeper refunding, the buyer refunding itself) goes through a `TxSender`, so
nonce handling and fee bumping live in one place.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from eth_abi.abi import decode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, TimeExhausted, TransactionNotFound, Web3RPCError
from web3.types import BlockIdentifier, TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import CONTRACTS, load_artifact
from escrow_py.chain.signer import Signer
from escrow_py.errors import ContractRevert, RpcError, TransactionFailed

# A replacement must pay at least 10% more (geth and most providers' rule); bump a little more.
REPLACEMENT_BUMP = 1.125
GAS_MARGIN = 1.2


@cache
def _error_abis() -> dict[bytes, tuple[str, list[str], list[str]]]:
    """Every custom error of the shipped contracts by selector: (name, arg names, arg types)."""
    table: dict[bytes, tuple[str, list[str], list[str]]] = {}
    for contract in CONTRACTS:
        for item in load_artifact(contract)["abi"]:
            if item["type"] != "error":
                continue
            types = [_abi_type(i) for i in item["inputs"]]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            table[selector] = (item["name"], [i["name"] or f"arg{n}" for n, i in enumerate(item["inputs"])], types)
    return table


def _abi_type(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in item["components"])
        return f"({inner}){item['type'][5:]}"
    return str(item["type"])


def decode_revert(data: bytes) -> ContractRevert:
    """Turn revert data into a ContractRevert naming the error and its values."""
    if len(data) >= 4:
        selector, body = data[:4], data[4:]
        if selector == keccak(text="Error(string)")[:4]:
            return ContractRevert("Error", {"message": decode(["string"], body)[0]}, data)
        if selector == keccak(text="Panic(uint256)")[:4]:
            return ContractRevert("Panic", {"code": decode(["uint256"], body)[0]}, data)
        known = _error_abis().get(selector)
        if known:
            name, names, types = known
            values = _try_decode(types, body)
            if values is not None:
                values = tuple(
                    to_checksum_address(v) if t == "address" else v for t, v in zip(types, values, strict=True)
                )
                return ContractRevert(name, dict(zip(names, values, strict=True)), data)
    return ContractRevert("UnknownRevert", {"data": data}, data)


def _try_decode(types: list[str], body: bytes) -> tuple[Any, ...] | None:
    try:
        return tuple(decode(types, body))
    except Exception:  # noqa: BLE001 - malformed revert data is reported raw by the caller
        return None


def revert_from_exception(exc: Exception) -> ContractRevert | None:
    """The ContractRevert behind a web3 exception from a call or gas estimate, if it is a revert."""
    data: Any = getattr(exc, "data", None)
    if isinstance(exc, (ContractCustomError, ContractLogicError)) or data:
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            return decode_revert(bytes.fromhex(data[2:]))
        if isinstance(data, (bytes, HexBytes)):
            return decode_revert(bytes(data))
        message = str(exc.args[0]) if exc.args else str(exc)
        return ContractRevert("Error", {"message": message})
    return None


def _revert_or(exc: rpc.NodeError) -> ContractRevert | rpc.NodeError:
    """The decoded revert behind a node error, or the node error itself when it is not a revert."""
    if exc.revert_data is not None:
        return decode_revert(exc.revert_data)
    if exc.is_revert:
        message = exc.error.get("message", "") if isinstance(exc.error, dict) else str(exc.error)
        return ContractRevert("Error", {"message": str(message)})
    return exc


@dataclass
class SentTx:
    """A signed transaction; `tx` is what was signed, so it can be replaced with the same nonce.

    `raw` and `tx_hash` exist before broadcast, so a caller can record them durably first
    and, after a crash, re-broadcast exactly the same transaction instead of a new one.
    """

    tx_hash: bytes
    nonce: int
    tx: dict[str, Any]
    raw: bytes = b""
    sent_at: float = field(default_factory=time.monotonic)


class TxSender:
    """Builds, signs, sends and confirms transactions for one signer; thread-safe."""

    def __init__(self, w3: Web3, signer: Signer, *, poll_interval: float = 0.05) -> None:
        self.w3 = w3
        self.signer = signer
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None

    @property
    def address(self) -> ChecksumAddress:
        return self.signer.address

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def fees(self) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas): twice the latest base fee plus the suggested tip."""
        try:
            base = int(str(rpc.request(self.w3, "eth_getBlockByNumber", ["latest", False])["baseFeePerGas"]), 16)
            tip = int(str(rpc.request(self.w3, "eth_maxPriorityFeePerGas", [])), 16)
        except (RpcError, KeyError, TypeError, ValueError) as exc:
            raise RpcError(f"cannot read fees: {exc}") from exc
        return 2 * base + tip, tip

    def call(self, to: str, data: bytes, *, block: BlockIdentifier = "latest") -> bytes:
        """eth_call as this sender; raises ContractRevert with the decoded error."""
        try:
            return rpc.call(
                self.w3, to, data, sender=self.address, block=block if isinstance(block, int) else str(block)
            )
        except rpc.NodeError as exc:
            raise _revert_or(exc) from None

    def estimate_gas(self, to: str | None, data: bytes) -> int:
        """Gas for a call to `to` (None: a contract creation); raises ContractRevert if it would revert."""
        try:
            return rpc.estimate_gas(self.w3, to, data, sender=self.address)
        except rpc.NodeError as exc:
            raise _revert_or(exc) from None

    def send(self, to: str | None, data: bytes, *, gas: int | None = None) -> SentTx:
        """Sign and broadcast (`to` None: create a contract).

        A revert found by the gas estimate raises ContractRevert before anything is sent.
        """
        signed = self.sign(to, data, gas=gas)
        self.broadcast(signed)
        return signed

    def sign(self, to: str | None, data: bytes, *, gas: int | None = None) -> SentTx:
        """Build and sign with the next nonce, without broadcasting: record it, then `broadcast` it.

        The nonce is taken; if the transaction is never broadcast, the node's pending count
        is the truth again after `resync_nonce()`.
        """
        if gas is None:
            gas = int(self.estimate_gas(to, data) * GAS_MARGIN)
        max_fee, tip = self.fees()
        with self._lock:
            nonce = self._take_nonce()
            tx: dict[str, Any] = {
                "type": 2,
                "chainId": self.chain_id,
                "from": self.address,
                "data": HexBytes(data),
                "value": 0,
                "nonce": nonce,
                "gas": gas,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": tip,
            }
            if to is not None:
                tx["to"] = to_checksum_address(to)
            raw = self.signer.sign_transaction(tx)
            self._next_nonce = nonce + 1
        return SentTx(bytes(keccak(raw)), nonce, tx, raw)

    def broadcast(self, signed: SentTx) -> None:
        """Send a signed transaction; sending one the node already knows is not an error."""
        try:
            self.broadcast_raw(signed.raw)
        except Exception:
            # The nonce may or may not have been consumed: ask the node next time.
            self.resync_nonce()
            raise

    def resync_nonce(self) -> None:
        with self._lock:
            self._next_nonce = None

    def replace(self, sent: SentTx, *, bump: float = REPLACEMENT_BUMP) -> SentTx:
        """Re-sign the same transaction with the same nonce and fees raised by at least 10%; not broadcast."""
        max_fee, tip = self.fees()
        tx = dict(sent.tx)
        tx["maxPriorityFeePerGas"] = max(int(sent.tx["maxPriorityFeePerGas"] * bump) + 1, tip)
        tx["maxFeePerGas"] = max(int(sent.tx["maxFeePerGas"] * bump) + 1, max_fee, tx["maxPriorityFeePerGas"])
        raw = self.signer.sign_transaction(tx)
        return SentTx(bytes(keccak(raw)), sent.nonce, tx, raw)

    def broadcast_raw(self, raw: bytes) -> bytes:
        try:
            return bytes(self.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            message = str(exc)
            if "already known" in message or "already imported" in message:
                return bytes(keccak(raw))
            raise RpcError(f"transaction rejected: {message}") from exc

    def _take_nonce(self) -> int:
        if self._next_nonce is None:
            self._next_nonce = int(self.w3.eth.get_transaction_count(self.address, "pending"))
        return self._next_nonce

    def receipt(self, tx_hash: bytes) -> TxReceipt | None:
        try:
            return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def wait(self, tx_hash: bytes, *, confirmations: int = 1, timeout: float = 120.0) -> TxReceipt:
        """The receipt once mined with `confirmations` blocks (1 = mined); raises TransactionFailed on status 0."""
        deadline = time.monotonic() + timeout
        while True:
            receipt = self.receipt(tx_hash)
            if receipt is not None:
                if receipt["status"] != 1:
                    raise TransactionFailed(tx_hash, self._failure_reason(receipt))
                if int(self.w3.eth.block_number) - int(receipt["blockNumber"]) + 1 >= confirmations:
                    return receipt
            if time.monotonic() > deadline:
                raise TimeExhausted(f"0x{tx_hash.hex()} not confirmed within {timeout:.0f}s")
            time.sleep(self.poll_interval)

    def transact(self, to: str | None, data: bytes, *, gas: int | None = None, confirmations: int = 1) -> TxReceipt:
        return self.wait(self.send(to, data, gas=gas).tx_hash, confirmations=confirmations)

    def _failure_reason(self, receipt: TxReceipt) -> str:
        """Replay the failed transaction at its block to recover the revert reason."""
        try:
            tx = self.w3.eth.get_transaction(receipt["transactionHash"])
            self.w3.eth.call(
                {"from": tx["from"], "to": tx["to"], "data": tx["input"], "gas": tx["gas"]},
                receipt["blockNumber"] - 1,
            )
        except Exception as exc:  # noqa: BLE001 - any failure here is the reason we are after
            revert = revert_from_exception(exc)
            return str(revert) if revert is not None else str(exc)
        return "reverted (reason not reproducible)"
