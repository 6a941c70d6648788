"""Sending transactions from one key: nonces, EIP-1559 fees, replacement, receipts, revert reasons.

Every role that writes to the chain (the seller depositing and delivering, the
keeper refunding, the buyer refunding itself) goes through a `TxSender`, so
nonce handling and fee bumping live in one place.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from eth_abi.abi import decode
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import BlockIdentifier, TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import CONTRACTS, load_artifact
from escrow_py.chain.signer import Signer
from escrow_py.protocol.errors import (
    ContractRevert,
    InsufficientFunds,
    NonceConflict,
    RpcError,
    TransactionFailed,
    TransactionTimeout,
)

# A replacement must pay at least 10% more (geth and most providers' rule); bump a little more.
REPLACEMENT_BUMP = 1.125
GAS_MARGIN = 1.2


ErrorTable = dict[bytes, tuple[str, list[str], list[str]]]

# Custom errors of contracts the runtime does not ship (the development tools' test tokens register theirs),
# so that a revert from them is reported by name, as the shipped contracts' are.
_registered_errors: ErrorTable = {}


def _errors_of(abi: list[dict[str, Any]]) -> ErrorTable:
    """The custom errors of one ABI by selector: (name, arg names, arg types)."""
    table: ErrorTable = {}
    for item in abi:
        if item["type"] != "error":
            continue
        types = [_abi_type(i) for i in item["inputs"]]
        selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
        table[selector] = (item["name"], [i["name"] or f"arg{n}" for n, i in enumerate(item["inputs"])], types)
    return table


@cache
def _error_abis() -> ErrorTable:
    """Every custom error of the shipped contracts by selector."""
    table: ErrorTable = {}
    for contract in CONTRACTS:
        table.update(_errors_of(load_artifact(contract)["abi"]))
    return table


def register_errors(abi: list[dict[str, Any]]) -> None:
    """Let `decode_revert` name the custom errors of another contract's ABI (the shipped ones win a clash)."""
    for selector, error in _errors_of(abi).items():
        _registered_errors.setdefault(selector, error)


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
        known = _error_abis().get(selector) or _registered_errors.get(selector)
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


def revert_or_node_error(exc: rpc.NodeError) -> ContractRevert | rpc.NodeError:
    """The decoded revert behind a node error, or the node error itself when it is not a revert."""
    if exc.revert_data is not None:
        return decode_revert(exc.revert_data)
    if exc.is_revert:
        message = exc.error.get("message", "") if isinstance(exc.error, dict) else str(exc.error)
        return ContractRevert("Error", {"message": str(message)})
    return exc


# What fees() reads: the latest block (its base fee, unless the caller has one) and the node's suggested tip.
_LATEST_BLOCK = rpc.Request("eth_getBlockByNumber", ["latest", False])
_TIP = rpc.Request("eth_maxPriorityFeePerGas", [])


def _fee_requests(base_fee: int | None) -> list[rpc.Request]:
    """The requests fees(base_fee) needs: the tip, and the latest block when no base fee is given."""
    return [_TIP] if base_fee is not None else [_LATEST_BLOCK, _TIP]


def _fees_from(answers: list[Any], base_fee: int | None) -> tuple[int, int]:
    """(maxFeePerGas, maxPriorityFeePerGas) from the answers to _fee_requests(base_fee)."""
    try:
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        if base_fee is None:
            base_fee = int(str(answers[0]["baseFeePerGas"]), 16)
        tip = int(str(answers[-1]), 16)
    except (RpcError, KeyError, TypeError, ValueError) as exc:
        raise RpcError(f"cannot read fees: {exc}") from exc
    return 2 * base_fee + tip, tip


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
    intent: str = ""  # what it is for (intent_of): a replacement keeps it, a different call never shares it


@dataclass
class WatchReport:
    """What `TxSender.watch` found among the transactions it follows."""

    final: list[bytes] = field(default_factory=list)  # mined and `depth` blocks deep: no longer followed
    replaced: list[bytes] = field(default_factory=list)  # its nonce went to another transaction (a replacement)
    dropped: list[SentTx] = field(default_factory=list)  # gone from chain and node (a reorg, an eviction)
    following: int = 0


OnSigned = Callable[[SentTx], None]


def signed_from_raw(raw: bytes, intent: str = "") -> SentTx:
    """A recorded signed transaction (EIP-1559) as a SentTx again: what a process that did not sign it needs to
    broadcast it once more or replace it with a fee bump at its nonce."""
    fields = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    tx: dict[str, Any] = {
        "type": 2,
        "chainId": int(fields["chainId"]),
        "data": HexBytes(fields["data"]),
        "value": int(fields["value"]),
        "gas": int(fields["gas"]),
        "nonce": int(fields["nonce"]),
        "maxFeePerGas": int(fields["maxFeePerGas"]),
        "maxPriorityFeePerGas": int(fields["maxPriorityFeePerGas"]),
    }
    if fields.get("to"):
        tx["to"] = to_checksum_address(fields["to"])
    return SentTx(bytes(keccak(raw)), tx["nonce"], tx, bytes(raw), intent=intent)


def intent_of(to: str | None, data: bytes) -> str:
    """The intent a transaction carries out: its target and calldata. Two transactions with one intent are
    one deposit, one refund or one batch sent twice; a replacement (fee bump) keeps its original's."""
    return "0x" + keccak((to or "").lower().encode() + b":" + data).hex()


class NonceBook(Protocol):
    """Durable nonce allocation and transaction records for a key shared by several processes (or hosts).

    `allocate_nonce` returns the next nonce of `address`, at least `at_least` (the node's pending
    count, which is ahead when the key was used elsewhere), and counts it as taken, atomically for
    every process on the book. `record_tx` keeps a signed transaction before it is broadcast.
    `give_back_nonce` returns a nonce whose transaction never left, if it is still the latest one
    taken (True); otherwise it stays a gap that `TxSender.confirm` fills. `lower_nonce` moves the
    next nonce back to `to` after a reorg dropped transactions. `txs_for` lists the recorded
    transactions of an intent, newest first. `unmined` lists the recorded transactions (of `intent`: its last
    few) whose nonce is `from_nonce` or above, newest first: with the key's confirmed count as `from_nonce`, what
    is in flight, or was signed and never left. `drop_tx` forgets a recorded transaction the node refused.
    """

    def allocate_nonce(self, address: str, at_least: int) -> int: ...

    def give_back_nonce(self, address: str, nonce: int) -> bool: ...

    def lower_nonce(self, address: str, to: int) -> None: ...

    def record_tx(self, address: str, signed: SentTx) -> None: ...

    def txs_for(self, address: str, intent: str) -> list[bytes]: ...

    def unmined(self, address: str, from_nonce: int, *, intent: str | None = None) -> list[SentTx]: ...

    def drop_tx(self, address: str, tx_hash: bytes) -> None: ...


# What nodes answer when a nonce is already used, or taken by a pending transaction of the same fee.
_NONCE_USED = ("nonce too low", "replacement transaction underpriced", "nonce has already been used", "already used")
_ALREADY_KNOWN = ("already known", "already imported")


class TxSender:
    """Builds, signs, sends and confirms transactions for one signer; thread-safe.

    Nonces: the next nonce is the higher of the node's pending count and this sender's
    own count, so a key also used elsewhere (another process, a wallet) is followed
    without a failed transaction; a `nonce too low` that slips through a race is
    answered by signing again once with a fresh nonce (`send`). A stuck transaction is
    repriced, or re-signed when it waits behind a gap (`confirm`).

    With `watch=True` every broadcast transaction is followed until `watch(depth)`
    finds it `depth` blocks deep; one that disappears (a reorg) resynchronises the
    nonce and is reported, so its owner can send it again.

    With a `book` (NonceBook), nonces come from the book instead of this process's count, and
    every signed transaction, replacements included, is recorded in it before broadcast: several
    processes sending from one key then never take one nonce twice.
    """

    def __init__(
        self,
        w3: Web3,
        signer: Signer,
        *,
        poll_interval: float = 0.05,
        watch: bool = False,
        book: NonceBook | None = None,
    ) -> None:
        self.w3 = w3
        self.signer = signer
        self.poll_interval = poll_interval
        self.book = book
        self._lock = threading.Lock()
        self._next_nonce: int | None = None
        self._chain_id: int | None = None
        self._watching = watch
        self._followed: dict[bytes, SentTx] = {}
        self._mined_at: dict[bytes, tuple[int, bytes]] = {}  # tx hash -> (block number, block hash) seen

    @property
    def address(self) -> ChecksumAddress:
        return self.signer.address

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def fees(self, base_fee: int | None = None) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas): twice the base fee plus the suggested tip.

        `base_fee` is one the caller read already (the pending block's, with the chain's clock);
        else the latest block's is read, in the same round trip as the tip.
        """
        return _fees_from(rpc.batch(self.w3, _fee_requests(base_fee)), base_fee)

    def _fees_and_pending_nonce(self, base_fee: int | None = None) -> tuple[int, int, int]:
        """fees(base_fee) and the key's pending transaction count, in one round trip: what signing reads."""
        nonce = rpc.Request("eth_getTransactionCount", [self.address, "pending"])
        *fees, pending = rpc.batch(self.w3, [*_fee_requests(base_fee), nonce])
        max_fee, tip = _fees_from(fees, base_fee)
        if isinstance(pending, BaseException):
            raise pending
        return max_fee, tip, int(str(pending), 16)

    def balance(self) -> int:
        """The key's ETH balance in wei (what it can pay gas with)."""
        return int(str(rpc.request(self.w3, "eth_getBalance", [self.address, "latest"])), 16)

    def call(self, to: str, data: bytes, *, block: BlockIdentifier = "latest") -> bytes:
        """eth_call as this sender; raises ContractRevert with the decoded error."""
        request = self.call_request(to, data, block=block if isinstance(block, int) else str(block))
        try:
            result: object = rpc.send(self.w3, request)
        except rpc.NodeError as exc:
            result = exc
        return self.output_from(result)

    def call_request(self, to: str, data: bytes, *, block: str | int = "latest") -> rpc.Request:
        """call as a request to batch with others; `output_from` reads its result."""
        return rpc.call_request(to, data, sender=self.address, block=block)

    @staticmethod
    def output_from(result: object) -> bytes:
        """The return data of a call's answer; its failure raised as `call` raises it (ContractRevert for a
        revert, the node's error otherwise)."""
        if isinstance(result, rpc.NodeError):
            raise revert_or_node_error(result) from None
        if isinstance(result, BaseException):
            raise result
        return rpc.call_output(result)

    def estimate_gas(self, to: str | None, data: bytes) -> int:
        """Gas for a call to `to` (None: a contract creation); raises ContractRevert if it would revert."""
        try:
            result = rpc.send(self.w3, self.estimate_gas_request(to, data))
        except rpc.NodeError as exc:
            result = exc
        return self.gas_from(result)

    def estimate_gas_request(self, to: str | None, data: bytes) -> rpc.Request:
        """estimate_gas as a request to batch with others; `gas_from` reads its result."""
        return rpc.estimate_gas_request(to, data, sender=self.address)

    def gas_from(self, result: object) -> int:
        """The gas of an estimate's answer; its failure raised as estimate_gas raises it (ContractRevert for
        a revert, InsufficientFunds when the key cannot pay, the node's error otherwise)."""
        if isinstance(result, rpc.NodeError):
            failure = revert_or_node_error(result)
            if isinstance(failure, rpc.NodeError) and "insufficient funds" in str(failure).lower():
                raise InsufficientFunds(self.address, str(failure)) from None
            raise failure from None
        if isinstance(result, BaseException):
            raise result
        return int(str(result), 16)

    def send(
        self,
        to: str | None,
        data: bytes,
        *,
        gas: int | None = None,
        on_signed: OnSigned | None = None,
        base_fee: int | None = None,
    ) -> SentTx:
        """Sign and broadcast (`to` None: create a contract); `on_signed` sees each signed transaction first.

        A revert found by the gas estimate raises ContractRevert before anything is sent. If
        the node says the nonce is used (the key sent elsewhere meanwhile), the nonce is read
        again and the transaction signed and sent once more; a second refusal raises
        NonceConflict. A key without gas money raises InsufficientFunds.
        """
        if gas is None:
            gas = int(self.estimate_gas(to, data) * GAS_MARGIN)
        for attempt in (1, 2):
            signed = self.sign(to, data, gas=gas, base_fee=base_fee)
            self._record(signed)
            if on_signed is not None:
                on_signed(signed)
            try:
                self.broadcast(signed)
            except NonceConflict:
                if attempt == 2:
                    raise
                continue
            return signed
        raise AssertionError("unreachable")

    def sign(self, to: str | None, data: bytes, *, gas: int | None = None, base_fee: int | None = None) -> SentTx:
        """Build and sign with the next nonce, without broadcasting: record it, then `broadcast` it.

        The nonce is taken; if the transaction is never broadcast, `resync_nonce()` lets the
        next one take it again.
        """
        if gas is None:
            gas = int(self.estimate_gas(to, data) * GAS_MARGIN)
        max_fee, tip, pending = self._fees_and_pending_nonce(base_fee)
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "from": self.address,
            "data": HexBytes(data),
            "value": 0,
            "gas": gas,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": tip,
        }
        if to is not None:
            tx["to"] = to_checksum_address(to)
        signed = self._sign_next(tx, pending)
        signed.intent = intent_of(to, data)
        return signed

    def _sign_next(self, tx: dict[str, Any], pending: int) -> SentTx:
        """Sign `tx` with the key's next nonce; `pending` is the node's pending transaction count, read just before."""
        if self.book is not None:
            # The book's row for this key is the one counter every process shares; the node's pending
            # count only matters when the key was used outside the book (then it is ahead).
            nonce = self.book.allocate_nonce(self.address, pending)
            tx = {**tx, "nonce": nonce}
            raw = self.signer.sign_transaction(tx)
            return SentTx(bytes(keccak(raw)), nonce, tx, raw)
        with self._lock:
            # The node's count is ahead of ours when the key was used elsewhere (another process, a
            # wallet): follow it rather than fail with `nonce too low`. Ours is ahead while our last
            # transactions are on their way to the node. Ours too far ahead (a reorg dropped one, a
            # broadcast was lost) is corrected by resync_nonce(), which watch, confirm and a failed
            # broadcast call.
            nonce = pending if self._next_nonce is None else max(pending, self._next_nonce)
            tx = {**tx, "nonce": nonce}
            raw = self.signer.sign_transaction(tx)
            self._next_nonce = nonce + 1
        return SentTx(bytes(keccak(raw)), nonce, tx, raw)

    def broadcast(self, signed: SentTx) -> None:
        """Send a signed transaction; sending one the node already knows is not an error."""
        try:
            self.broadcast_raw(signed.raw)
        except NonceConflict:
            if self.book is None:
                self.resync_nonce()
            else:  # the nonce is used (the key was used elsewhere): the next allocation skips it; this one never left
                self.book.drop_tx(self.address, signed.tx_hash)
            raise
        except Exception as exc:
            if self.book is None:
                self.resync_nonce()  # the nonce may or may not have been consumed: ask the node next time
            elif isinstance(exc, RpcError) and not isinstance(exc, TimeoutError):
                # The node refused it, so it never left: give the nonce back if nobody took a later one
                # (else a gap, which confirm() fills). Never move the shared counter back past other
                # processes' nonces. A lost answer (a timeout) may hide an accepted transaction: kept.
                self.book.give_back_nonce(self.address, signed.nonce)
                # Nor is its record left for another process to finish later: a deposit refused now (and its payment
                # forgotten) must not land when some poster sends what the book holds.
                self.book.drop_tx(self.address, signed.tx_hash)
            raise
        self._follow(signed)

    def _record(self, signed: SentTx) -> None:
        """Keep the signed transaction in the book before it can leave (no book: nothing to do)."""
        if self.book is not None:
            self.book.record_tx(self.address, signed)

    def resync_nonce(self) -> None:
        """Forget the cached nonce: the next one is the node's pending count (no-op with a book: it is shared)."""
        with self._lock:
            self._next_nonce = None

    def replace(self, sent: SentTx, *, bump: float = REPLACEMENT_BUMP) -> SentTx:
        """Re-sign the same transaction with the same nonce and fees raised by at least 10%; not broadcast."""
        max_fee, tip = self.fees()
        tx = dict(sent.tx)
        tx["maxPriorityFeePerGas"] = max(int(sent.tx["maxPriorityFeePerGas"] * bump) + 1, tip)
        tx["maxFeePerGas"] = max(int(sent.tx["maxFeePerGas"] * bump) + 1, max_fee, tx["maxPriorityFeePerGas"])
        raw = self.signer.sign_transaction(tx)
        return SentTx(bytes(keccak(raw)), sent.nonce, tx, raw, intent=sent.intent)

    def broadcast_raw(self, raw: bytes) -> bytes:
        """eth_sendRawTransaction; NonceConflict, InsufficientFunds or RpcError when the node refuses."""
        try:
            return bytes(self.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            message = str(exc)
            lowered = message.lower()
            if any(text in lowered for text in _ALREADY_KNOWN):
                return bytes(keccak(raw))
            if any(text in lowered for text in _NONCE_USED):
                raise NonceConflict(self.address, message) from exc
            if "insufficient funds" in lowered:
                raise InsufficientFunds(self.address, message) from exc
            raise RpcError(f"transaction rejected: {message}") from exc

    def confirmed_nonce(self) -> int:
        """How many of the key's transactions are mined: every nonce below this one is used."""
        return int(self.w3.eth.get_transaction_count(self.address, "latest"))

    def receipt(self, tx_hash: bytes) -> TxReceipt | None:
        try:
            return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def wait(self, tx_hash: bytes, *, confirmations: int = 1, timeout: float = 120.0) -> TxReceipt:
        """The receipt once mined with `confirmations` blocks (1 = mined); raises TransactionFailed on status 0.

        TransactionTimeout after `timeout` seconds without it.
        """
        deadline = time.monotonic() + timeout
        while True:
            receipt = self._confirmed_receipt(tx_hash, confirmations)
            if receipt is not None:
                return receipt
            if time.monotonic() > deadline:
                raise TransactionTimeout([tx_hash], -1, timeout)
            time.sleep(self.poll_interval)

    def _confirmed_receipt(
        self, tx_hash: bytes, confirmations: int, receipt: TxReceipt | None = None
    ) -> TxReceipt | None:
        """The receipt (read now unless given) once `confirmations` deep, else None; TransactionFailed on status 0."""
        if receipt is None:
            receipt = self.receipt(tx_hash)
        if receipt is None:
            return None
        if receipt["status"] != 1:
            raise TransactionFailed(tx_hash, self._failure_reason(receipt))
        # A receipt is one confirmation by itself: the head is only asked for when more are wanted.
        if confirmations > 1 and int(self.w3.eth.block_number) - int(receipt["blockNumber"]) + 1 < confirmations:
            return None
        return receipt

    def confirm(
        self,
        sent: SentTx,
        *,
        confirmations: int = 1,
        timeout: float = 120.0,
        reprice_after: float | None = None,
        on_signed: OnSigned | None = None,
        earlier: Sequence[SentTx] = (),
    ) -> TxReceipt:
        """The receipt of `sent`, or of a replacement of it, once mined with `confirmations` blocks.

        `earlier`: other versions of `sent` (same nonce and intent, signed before it, by any process), any of
        which may be the one mined.

        A transaction not mined after `reprice_after` seconds is stuck, and holds back every
        later one of the key. If it waits behind a gap (a transaction before it vanished in a
        reorg, or never reached the node), the nonce is resynchronised and the gap filled with
        empty transfers to the key itself; otherwise it is signed again with the same nonce
        and fees raised by at least 10%. Again after each further `reprice_after`; `on_signed`
        sees each new version before it is broadcast. If the nonces of all of them were taken by some other
        transaction, none can be mined: TransactionTimeout at once. Otherwise after `timeout`
        seconds: TransactionTimeout naming every hash (one of them may still be mined).
        """
        start = time.monotonic()
        attempts = [*earlier, sent]
        next_check = start + reprice_after if reprice_after else float("inf")
        while True:
            for attempt in attempts:
                if (receipt := self.receipt(attempt.tx_hash)) is not None:
                    final = self._confirmed_receipt(attempt.tx_hash, confirmations, receipt)
                    if final is not None:
                        return final
                    break
            else:
                now = time.monotonic()
                if (now >= next_check or now - start > timeout) and self._all_superseded(attempts):
                    self.resync_nonce()
                    raise TransactionTimeout([a.tx_hash for a in attempts], sent.nonce, now - start)
                if now - start > timeout:
                    raise TransactionTimeout([a.tx_hash for a in attempts], sent.nonce, timeout)
                if reprice_after is not None and now >= next_check:
                    unstuck = self._unstick(attempts[-1], on_signed)
                    if unstuck is not attempts[-1]:
                        attempts.append(unstuck)
                    next_check = now + reprice_after
            time.sleep(self.poll_interval)

    def _all_superseded(self, attempts: list[SentTx]) -> bool:
        """Every attempt's nonce is used on chain, by none of them."""
        used = self.confirmed_nonce()
        return all(a.nonce < used for a in attempts) and not any(self.receipt(a.tx_hash) for a in attempts)

    def _unstick(self, stuck: SentTx, on_signed: OnSigned | None) -> SentTx:
        pending = int(self.w3.eth.get_transaction_count(self.address, "pending"))
        if pending < stuck.nonce:
            # Queued behind a gap (a transaction before it vanished in a reorg, or never reached the
            # node): no fee makes it minable. Fill the gap with empty transfers to ourselves, so it is
            # mined as it is, rather than signing the same call again at the gap and running it twice.
            self.resync_nonce()
            for nonce in range(pending, stuck.nonce):
                self._fill_gap(nonce, stuck)
            return stuck
        replacement = self.replace(stuck)
        self._record(replacement)
        if on_signed is not None:
            on_signed(replacement)
        try:
            self.broadcast_raw(replacement.raw)
        except NonceConflict:
            pass  # mined meanwhile, or the node wants a larger bump: the next round sees which
        else:
            self._follow(replacement)
        return replacement

    def _fill_gap(self, nonce: int, like: SentTx) -> None:
        max_fee, tip = self.fees()
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "from": self.address,
            "to": self.address,
            "data": HexBytes(b""),
            "value": 0,
            "nonce": nonce,
            "gas": 21_000,
            "maxFeePerGas": max(max_fee, int(like.tx["maxFeePerGas"])),
            "maxPriorityFeePerGas": max(tip, int(like.tx["maxPriorityFeePerGas"])),
        }
        raw = self.signer.sign_transaction(tx)
        self._record(SentTx(bytes(keccak(raw)), nonce, tx, raw, intent=f"gap:{nonce}"))
        # NonceConflict: filled meanwhile (by our own next transaction, or the key's other user).
        with contextlib.suppress(NonceConflict):
            self.broadcast_raw(raw)

    def transact(
        self,
        to: str | None,
        data: bytes,
        *,
        gas: int | None = None,
        confirmations: int = 1,
        timeout: float = 120.0,
        reprice_after: float | None = None,
        on_signed: OnSigned | None = None,
        base_fee: int | None = None,
    ) -> TxReceipt:
        """`send` then `confirm`: the receipt, repricing a stuck transaction every `reprice_after` seconds.

        With a book, a transaction of the same intent already signed (by any process on the book) whose
        nonce is still unused is finished instead (`finish`): broadcast again if the node lacks it, repriced
        at its nonce if it is stuck. One intent is never in flight twice, nor sent at a second nonce.
        """
        if self.book is not None and (signed := self.book.unmined(self.address, 0, intent=intent_of(to, data))):
            # Only when the intent was signed before (rare) is the chain asked which of those nonces are used.
            used = self.confirmed_nonce()
            if versions := [s for s in signed if s.nonce >= used]:
                finished = self.finish(versions, confirmations=confirmations, timeout=timeout,
                                       reprice_after=reprice_after, on_signed=on_signed)  # fmt: skip
                if finished is not None:
                    return finished
        sent = self.send(to, data, gas=gas, on_signed=on_signed, base_fee=base_fee)
        return self.confirm(
            sent, confirmations=confirmations, timeout=timeout, reprice_after=reprice_after, on_signed=on_signed
        )

    def finish(
        self,
        versions: Sequence[SentTx],
        *,
        confirmations: int = 1,
        timeout: float = 120.0,
        reprice_after: float | None = None,
        on_signed: OnSigned | None = None,
    ) -> TxReceipt | None:
        """Finish a transaction another process (or an earlier run) signed: `versions` of it, one nonce and intent,
        newest first, as the book keeps them. Broadcast again if the node knows none of them (signed and never
        sent, or evicted), then confirmed, repriced at the same nonce while stuck. None when its nonce went to
        another transaction meanwhile and none of the versions was mined: the caller may send it anew.
        """
        signed = SentTx(versions[0].tx_hash, versions[0].nonce, {**versions[0].tx, "from": self.address},
                        versions[0].raw, intent=versions[0].intent)  # fmt: skip
        earlier = list(versions[1:])[::-1]
        if not any(self.known_to_node(v.tx_hash) for v in versions):
            try:
                self.broadcast_raw(signed.raw)
            except NonceConflict:
                if not any(self.receipt(v.tx_hash) for v in versions):
                    return None
            except RpcError:
                # Refused as it is (its fee is below today's base fee): the same call at the same nonce, repriced.
                earlier.append(signed)
                signed = self.replace(signed)
                self._record(signed)
                if on_signed is not None:
                    on_signed(signed)
                self.broadcast_raw(signed.raw)
        self._follow(signed)
        return self.confirm(signed, confirmations=confirmations, timeout=timeout, reprice_after=reprice_after,
                            on_signed=on_signed, earlier=earlier)  # fmt: skip

    def finish_unmined(
        self, *, confirmations: int = 1, timeout: float = 120.0, reprice_after: float | None = None
    ) -> list[TxReceipt]:
        """Finish every transaction of the book signed at a nonce not used on chain yet, lowest nonce first: what a
        process that died (a poster whose lease lapsed) left in flight or never broadcast. Until they are mined
        (or their nonces taken) every later transaction of the key waits behind them."""
        if self.book is None:
            return []
        by_nonce: dict[int, list[SentTx]] = {}
        for signed in self.book.unmined(self.address, self.confirmed_nonce()):
            by_nonce.setdefault(signed.nonce, []).append(signed)
        receipts = []
        for nonce in sorted(by_nonce):
            versions = [v for v in by_nonce[nonce] if v.intent == by_nonce[nonce][0].intent]
            receipt = self.finish(versions, confirmations=confirmations, timeout=timeout, reprice_after=reprice_after)
            if receipt is not None:
                receipts.append(receipt)
        return receipts

    # -- following sent transactions through reorgs -------------------------------------------

    def _follow(self, signed: SentTx) -> None:
        if self._watching:
            with self._lock:
                self._followed[signed.tx_hash] = signed

    def watch(self, depth: int) -> WatchReport:
        """Look at every followed transaction once: settled `depth` blocks deep, replaced, or dropped.

        A mined one is checked by its block's hash (one call per block, not per transaction);
        one whose block was reorged away and that is neither mined elsewhere nor back in the
        node's pool is dropped. A drop leaves the key's nonce where the chain says, so the
        cached nonce is resynchronised; the owner of the transaction decides whether to send
        it again.
        """
        report = WatchReport()
        with self._lock:
            followed = list(self._followed.values())
        if not followed:
            return report
        head = int(self.w3.eth.block_number)
        canonical: dict[int, bytes | None] = {}
        used: int | None = None
        for sent in followed:
            mined = self._mined_at.get(sent.tx_hash)
            if mined is not None:
                number, block_hash = mined
                if number not in canonical:
                    canonical[number] = self._block_hash(number)
                if canonical[number] == block_hash:
                    if head - number + 1 >= depth:
                        report.final.append(sent.tx_hash)
                        self._unfollow(sent.tx_hash)
                    continue
                self._mined_at.pop(sent.tx_hash, None)  # its block is gone: where is it now?
            receipt = self.receipt(sent.tx_hash)
            if receipt is not None:
                self._mined_at[sent.tx_hash] = (int(receipt["blockNumber"]), bytes(receipt["blockHash"]))
                continue
            if self.known_to_node(sent.tx_hash):
                continue  # in the pool (pending, or back there after a reorg): confirm() or the next pass sees it
            if mined is None:
                used = self.confirmed_nonce() if used is None else used
                if sent.nonce < used:
                    report.replaced.append(sent.tx_hash)  # a replacement of it (another use of its nonce) was mined
                    self._unfollow(sent.tx_hash)
                    continue
            # Gone from the chain and from the node: a reorg took its block, or the pool evicted it.
            report.dropped.append(sent)
            self._unfollow(sent.tx_hash)
        if report.dropped:
            self.resync_nonce()
            if self.book is not None:  # the dropped nonces are free again on chain: reuse them first
                self.book.lower_nonce(self.address, int(self.w3.eth.get_transaction_count(self.address, "pending")))
        with self._lock:
            report.following = len(self._followed)
        return report

    def _block_hash(self, number: int) -> bytes | None:
        block = rpc.request(self.w3, "eth_getBlockByNumber", [hex(number), False])
        return bytes.fromhex(str(block["hash"])[2:]) if block else None

    def followed(self, tx_hash: bytes) -> SentTx | None:
        """The signed transaction `tx_hash` if this sender broadcast it and still follows it."""
        with self._lock:
            return self._followed.get(tx_hash)

    def _unfollow(self, tx_hash: bytes) -> None:
        with self._lock:
            self._followed.pop(tx_hash, None)
            self._mined_at.pop(tx_hash, None)

    def known_to_node(self, tx_hash: bytes) -> bool:
        """Whether the node has the transaction, mined or in its pool."""
        try:
            self.w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return False
        return True

    def _failure_reason(self, receipt: TxReceipt) -> str:
        """The revert reason of a mined, failed transaction.

        Best from the node's trace of the transaction itself (exact, even when an earlier
        transaction of the same block caused it); where tracing is not offered, by replaying
        it as a call on the state after its block, then before it.
        """
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        try:
            trace = rpc.request(self.w3, "debug_traceTransaction", [tx_hash, {"tracer": "callTracer"}])
            output = str(trace.get("output") or "0x")
            if len(output) > 2:
                return str(decode_revert(bytes.fromhex(output[2:])))
        except (RpcError, AttributeError, ValueError):
            pass  # no tracing on this node: replay instead
        tx = self.w3.eth.get_transaction(receipt["transactionHash"])
        for block in (receipt["blockNumber"], receipt["blockNumber"] - 1):
            try:
                self.w3.eth.call({"from": tx["from"], "to": tx["to"], "data": tx["input"], "gas": tx["gas"]}, block)
            except Exception as exc:  # noqa: BLE001 - any failure here is the reason we are after
                revert = revert_from_exception(exc)
                return str(revert) if revert is not None else str(exc)
        return "reverted (reason not reproducible)"
