"""Typed binding to a deployed X402Escrow: reads, calldata, transactions and events.

escrow = Escrow(w3, address)
escrow.state_of(escrow_id)                      -> State
escrow.deposit(sender, terms, auth, signature)  -> receipt
escrow.deliver_many(sender, [(terms, hash), ...])
escrow.events(from_block, to_block)             -> [Deposited | Delivered | Refunded]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import decode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.types import LogReceipt, TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.authorization import Authorization
from escrow_py.chain.blocks import LOG_CHUNK, find_in_chunks, first_block_at
from escrow_py.chain.tx import TxSender
from escrow_py.terms import State, Terms

ESCROW_ABI: list[dict[str, Any]] = load_artifact("X402Escrow")["abi"]

DEPOSITED_TOPIC = keccak(text="Deposited(bytes32,address,address,address,address,uint256,uint64,bytes32,bytes32)")
DELIVERED_TOPIC = keccak(text="Delivered(bytes32,bytes32)")
REFUNDED_TOPIC = keccak(text="Refunded(bytes32,address)")


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where an event was emitted; `block_hash` lets an indexer notice reorgs."""

    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int


@dataclass(frozen=True, slots=True)
class Deposited:
    id: bytes
    terms: Terms
    at: LogPosition


@dataclass(frozen=True, slots=True)
class Delivered:
    id: bytes
    delivery_hash: bytes
    at: LogPosition


@dataclass(frozen=True, slots=True)
class Refunded:
    id: bytes
    caller: ChecksumAddress
    at: LogPosition


EscrowEvent = Deposited | Delivered | Refunded


def _address_topic(topic: bytes) -> ChecksumAddress:
    return to_checksum_address(topic[12:])


def decode_log(log: LogReceipt | dict[str, Any]) -> EscrowEvent | None:
    """Decode one escrow log; None for a log that is not an escrow event."""
    topics = [bytes(t) for t in log["topics"]]
    if not topics:
        return None
    at = LogPosition(
        block_number=int(log["blockNumber"]),
        block_hash=bytes(log["blockHash"]),
        tx_hash=bytes(log["transactionHash"]),
        log_index=int(log["logIndex"]),
    )
    data = bytes(log["data"])
    if topics[0] == DEPOSITED_TOPIC and len(topics) == 4:
        operator, token, amount, deadline, request_hash, salt = decode(
            ["address", "address", "uint256", "uint64", "bytes32", "bytes32"], data
        )
        terms = Terms(
            buyer=_address_topic(topics[2]),
            seller=_address_topic(topics[3]),
            operator=operator,
            token=token,
            amount=amount,
            deadline=deadline,
            request_hash=request_hash,
            salt=salt,
        )
        return Deposited(topics[1], terms, at)
    if topics[0] == DELIVERED_TOPIC and len(topics) == 2:
        (delivery_hash,) = decode(["bytes32"], data)
        return Delivered(topics[1], delivery_hash, at)
    if topics[0] == REFUNDED_TOPIC and len(topics) == 3:
        return Refunded(topics[1], _address_topic(topics[2]), at)
    return None


_STATE_OF = keccak(text="stateOf(bytes32)")[:4]


class Escrow:
    """A deployed X402Escrow at `address` on the chain behind `w3`."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=ESCROW_ABI)
        self._chain_id: int | None = None

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def id_of(self, terms: Terms) -> bytes:
        """The escrow id, computed locally (no RPC)."""
        return terms.escrow_id(self.chain_id, self.address)

    # -- reads ---------------------------------------------------------------------------

    def state_of(self, escrow_id: bytes, block: str | int = "latest") -> State:
        return State(int.from_bytes(rpc.call(self.w3, self.address, _STATE_OF + escrow_id, block=block), "big"))

    def onchain_terms_hash(self, terms: Terms) -> bytes:
        return bytes(self.contract.functions.termsHash(terms.as_tuple()).call())

    def onchain_escrow_id(self, terms: Terms) -> bytes:
        return bytes(self.contract.functions.escrowId(terms.as_tuple()).call())

    # -- calldata ------------------------------------------------------------------------

    def _data(self, fn: str, *args: Any) -> bytes:
        return bytes(HexBytes(self.contract.encode_abi(fn, args=list(args))))

    def deposit_data(self, terms: Terms, authorization: Authorization, signature: bytes) -> bytes:
        return self._data("deposit", terms.as_tuple(), authorization.valid_after, authorization.valid_before, signature)

    def deliver_data(self, terms: Terms, delivery_hash: bytes) -> bytes:
        return self._data("deliver", terms.as_tuple(), delivery_hash)

    def refund_data(self, terms: Terms) -> bytes:
        return self._data("refund", terms.as_tuple())

    def deliver_many_data(self, entries: Sequence[tuple[Terms, bytes]]) -> bytes:
        # Grouping by (token, seller) lets the contract pay each group in one transfer.
        ordered = sorted(entries, key=lambda e: (e[0].token, e[0].seller))
        return self._data("deliverMany", [t.as_tuple() for t, _ in ordered], [h for _, h in ordered])

    def refund_many_data(self, terms: Iterable[Terms]) -> bytes:
        ordered = sorted(terms, key=lambda t: (t.token, t.buyer))
        return self._data("refundMany", [t.as_tuple() for t in ordered])

    # -- transactions (each waits for `confirmations` and raises on failure) ---------------

    def deposit(
        self,
        sender: TxSender,
        terms: Terms,
        authorization: Authorization,
        signature: bytes,
        *,
        gas: int | None = None,
        confirmations: int = 1,
    ) -> TxReceipt:
        """`gas` None: estimated first (the estimate is a simulation: a revert raises before sending)."""
        return sender.transact(
            self.address, self.deposit_data(terms, authorization, signature), gas=gas, confirmations=confirmations
        )

    def deliver(self, sender: TxSender, terms: Terms, delivery_hash: bytes, *, confirmations: int = 1) -> TxReceipt:
        return sender.transact(self.address, self.deliver_data(terms, delivery_hash), confirmations=confirmations)

    def refund(self, sender: TxSender, terms: Terms, *, confirmations: int = 1) -> TxReceipt:
        return sender.transact(self.address, self.refund_data(terms), confirmations=confirmations)

    def deliver_many(
        self, sender: TxSender, entries: Sequence[tuple[Terms, bytes]], *, confirmations: int = 1
    ) -> TxReceipt:
        return sender.transact(self.address, self.deliver_many_data(entries), confirmations=confirmations)

    def refund_many(self, sender: TxSender, terms: Sequence[Terms], *, confirmations: int = 1) -> TxReceipt:
        return sender.transact(self.address, self.refund_many_data(terms), confirmations=confirmations)

    # -- events --------------------------------------------------------------------------

    def events_in(self, receipt: TxReceipt) -> list[EscrowEvent]:
        """The escrow events of one transaction, in log order."""
        events = []
        for log in receipt["logs"]:
            if to_checksum_address(log["address"]) == self.address and (event := decode_log(log)):
                events.append(event)
        return events

    def events(self, from_block: int, to_block: int) -> list[EscrowEvent]:
        """Every escrow event in [from_block, to_block], in chain order (one eth_getLogs)."""
        logs = self.w3.eth.get_logs(
            {
                "address": self.address,
                "fromBlock": from_block,
                "toBlock": to_block,
                "topics": [[HexBytes(DEPOSITED_TOPIC), HexBytes(DELIVERED_TOPIC), HexBytes(REFUNDED_TOPIC)]],
            }
        )
        return [event for log in logs if (event := decode_log(log)) is not None]

    def delivery_of(
        self, escrow_id: bytes, *, since: int, until: int | None = None, chunk: int = LOG_CHUNK
    ) -> Delivered | None:
        """The Delivered event of `escrow_id`, searched among blocks stamped from `since` to `until` (chain time).

        A delivery is mined after the deposit and before the deadline, so the signing time and
        the deadline bound the search; it runs in LOG_CHUNK-block eth_getLogs calls a public RPC accepts.
        """
        latest = int(self.w3.eth.block_number)
        first = first_block_at(self.w3, since, latest=latest)
        last = latest if until is None else min(latest, first_block_at(self.w3, until, latest=latest))

        def fetch(start: int, end: int) -> Delivered | None:
            logs = self.w3.eth.get_logs(
                {
                    "address": self.address,
                    "fromBlock": start,
                    "toBlock": end,
                    "topics": [HexBytes(DELIVERED_TOPIC), HexBytes(escrow_id)],
                }
            )
            return next((e for log in logs if isinstance(e := decode_log(log), Delivered) and e.id == escrow_id), None)

        return find_in_chunks(fetch, first, last, chunk)

    def delivery_in(self, tx_hash: bytes, escrow_id: bytes) -> Delivered | None:
        """The Delivered event of `escrow_id` in transaction `tx_hash` (a seller's pointer, checked here)."""
        try:
            receipt = self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None
        return next((e for e in self.events_in(receipt) if isinstance(e, Delivered) and e.id == escrow_id), None)


def deploy(sender: TxSender, contract: str, *constructor_args: Any, confirmations: int = 1) -> ChecksumAddress:
    """Deploy a shipped artifact from `sender`; returns its address."""
    artifact = load_artifact(contract)
    factory = sender.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    data = bytes(HexBytes(factory.constructor(*constructor_args).data_in_transaction))
    receipt = sender.transact(None, data, confirmations=confirmations)
    address = receipt["contractAddress"]
    if address is None:
        raise RuntimeError(f"deployment of {contract} produced no contract address")
    return to_checksum_address(address)
