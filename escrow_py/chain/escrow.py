"""Typed binding to a deployed X402Escrow: reads, calldata, transactions and events.

escrow = Escrow(w3, address)
escrow.state_of(escrow_id)                      -> State
escrow.deposit(sender, terms, auth, signature)  -> receipt
escrow.deliver_many(sender, [(terms, hash), ...])
escrow.settle_many(sender, [Settlement(terms, auth, signature, hash), ...])
escrow.simulate_settle_many(sender, entries)    -> SettleManyResult (what would be skipped)
escrow.events(from_block, to_block)             -> [Deposited | Delivered | Refunded]
escrow.settlements_in(receipt)                  -> [Settled | SettlementSkipped]
escrow.payout_failures_in(receipt)              -> [PayoutFailed]
deploy_escrow(sender)                           -> ESCROW_ADDRESS, through the CREATE2 proxy
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

from eth_abi.abi import decode, encode
from eth_typing import ABIFunction, ChecksumAddress
from eth_utils.abi import collapse_if_tuple, function_abi_to_4byte_selector
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.types import LogReceipt, TxReceipt

from escrow_py.chain import rpc
from escrow_py.chain.artifacts import load_artifact
from escrow_py.chain.blocks import LOG_CHUNK, find_in_chunks, first_block_at
from escrow_py.chain.registry import CREATE2_PROXY, ESCROW_SALT, create2_address, escrow_init_code
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.eip3009 import Authorization
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import State, Terms

ESCROW_ABI: list[dict[str, Any]] = load_artifact("X402Escrow")["abi"]


@functools.cache
def _function(name: str) -> tuple[bytes, tuple[str, ...]]:
    """The selector and argument types of the escrow's function `name` (no two share a name), from its ABI: a
    call's data is encoded by eth_abi directly, where web3's contract encoder normalises and re-validates every
    argument against the whole ABI on each call (milliseconds per payment, on the paying path)."""
    (abi,) = [e for e in ESCROW_ABI if e.get("type") == "function" and e["name"] == name]
    return function_abi_to_4byte_selector(cast(ABIFunction, abi)), tuple(collapse_if_tuple(i) for i in abi["inputs"])


DEPOSITED_TOPIC = keccak(text="Deposited(bytes32,address,address,address,address,uint256,uint64,bytes32,bytes32)")
DELIVERED_TOPIC = keccak(text="Delivered(bytes32,bytes32)")
REFUNDED_TOPIC = keccak(text="Refunded(bytes32,address)")
SETTLED_TOPIC = keccak(text="Settled(bytes32,bytes32)")
SETTLEMENT_SKIPPED_TOPIC = keccak(text="SettlementSkipped(bytes32,uint8)")
PAYOUT_FAILED_TOPIC = keccak(text="PayoutFailed(address,address,uint256)")


class SkipReason(IntEnum):
    """Why `settleMany` skipped an entry (X402Escrow.SkipReason)."""

    DEADLINE_PASSED = 0
    NOT_A_CONTRACT = 1
    INSUFFICIENT_BALANCE = 2
    PULL_FAILED = 3


@dataclass(frozen=True, slots=True)
class Settlement:
    """One serve-first payment to settle: the buyer's signed authorization and the hash of what was served."""

    terms: Terms
    authorization: Authorization
    signature: bytes
    delivery_hash: bytes

    def as_tuple(self) -> tuple[Any, ...]:
        """The ABI tuple of X402Escrow.Settlement."""
        return (
            self.terms.as_tuple(),
            self.authorization.valid_after,
            self.authorization.valid_before,
            self.signature,
            self.delivery_hash,
        )


@dataclass(frozen=True, slots=True)
class SettleManyResult:
    """What a `settleMany` did (or, simulated, would do): how many settled, and which entries it skipped."""

    settled: int
    skipped: list[Settlement]


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


@dataclass(frozen=True, slots=True)
class Settled:
    """A serve-first payment was pulled and paid to the seller, committing the delivery hash."""

    id: bytes
    delivery_hash: bytes
    at: LogPosition


@dataclass(frozen=True, slots=True)
class SettlementSkipped:
    """`settleMany` skipped this entry: nothing moved for it."""

    id: bytes
    reason: SkipReason
    at: LogPosition


@dataclass(frozen=True, slots=True)
class PayoutFailed:
    """A `deliverMany`/`refundMany` payout failed: its entries are Held again and emitted no settlement event."""

    token: ChecksumAddress
    to: ChecksumAddress
    amount: int
    at: LogPosition


# The events of an escrow's life (what the keeper indexes); the serve-first and batch-failure events apart.
EscrowEvent = Deposited | Delivered | Refunded
SettlementEvent = Settled | SettlementSkipped


def _address_topic(topic: bytes) -> ChecksumAddress:
    return to_checksum_address(topic[12:])


def _position(log: LogReceipt | dict[str, Any]) -> LogPosition:
    return LogPosition(
        block_number=int(log["blockNumber"]),
        block_hash=bytes(log["blockHash"]),
        tx_hash=bytes(log["transactionHash"]),
        log_index=int(log["logIndex"]),
    )


def decode_log(log: LogReceipt | dict[str, Any]) -> EscrowEvent | None:
    """Decode one escrow log of an escrow's life; None for any other log (serve-first events included)."""
    topics = [bytes(t) for t in log["topics"]]
    if not topics:
        return None
    at = _position(log)
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


def decode_settlement_log(log: LogReceipt | dict[str, Any]) -> SettlementEvent | PayoutFailed | None:
    """Decode one `Settled`, `SettlementSkipped` or `PayoutFailed` log; None for any other log."""
    topics = [bytes(t) for t in log["topics"]]
    if not topics:
        return None
    data = bytes(log["data"])
    if topics[0] == SETTLED_TOPIC and len(topics) == 2:
        (delivery_hash,) = decode(["bytes32"], data)
        return Settled(topics[1], delivery_hash, _position(log))
    if topics[0] == SETTLEMENT_SKIPPED_TOPIC and len(topics) == 2:
        (reason,) = decode(["uint8"], data)
        return SettlementSkipped(topics[1], SkipReason(reason), _position(log))
    if topics[0] == PAYOUT_FAILED_TOPIC and len(topics) == 3:
        (amount,) = decode(["uint256"], data)
        return PayoutFailed(_address_topic(topics[1]), _address_topic(topics[2]), amount, _position(log))
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
        return self.state_from(rpc.send(self.w3, self.state_request(escrow_id, block)))

    def state_request(self, escrow_id: bytes, block: str | int = "latest") -> rpc.Request:
        """state_of as a request to batch with others; `state_from` reads its result."""
        return rpc.call_request(self.address, _STATE_OF + escrow_id, block=block)

    @staticmethod
    def state_from(result: object) -> State:
        return State(int.from_bytes(rpc.call_output(result), "big"))

    def onchain_terms_hash(self, terms: Terms) -> bytes:
        return bytes(self.contract.functions.termsHash(terms.as_tuple()).call())

    def onchain_escrow_id(self, terms: Terms) -> bytes:
        return bytes(self.contract.functions.escrowId(terms.as_tuple()).call())

    # -- calldata ------------------------------------------------------------------------

    def _data(self, fn: str, *args: Any) -> bytes:
        selector, types = _function(fn)
        return selector + encode(types, args)

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

    def settle_data(self, entry: Settlement) -> bytes:
        auth = entry.authorization
        return self._data(
            "settle", entry.terms.as_tuple(), auth.valid_after, auth.valid_before, entry.signature, entry.delivery_hash
        )

    @staticmethod
    def order_for_payout(entries: Iterable[Settlement]) -> list[Settlement]:
        """Grouped by (token, seller), so the contract pays each group in one transfer: `settleMany`'s order."""
        return sorted(entries, key=lambda e: (e.terms.token, e.terms.seller))

    def settle_many_data(self, entries: Sequence[Settlement]) -> bytes:
        """settleMany calldata, in `order_for_payout` order (its `skipped` indexes refer to that order)."""
        return self._data("settleMany", [e.as_tuple() for e in self.order_for_payout(entries)])

    def decode_settle_many(self, entries: Sequence[Settlement], output: bytes) -> SettleManyResult:
        """settleMany's return data, with the skipped indexes turned back into the entries."""
        settled, skipped = decode(["uint256", "uint256[]"], output)
        ordered = self.order_for_payout(entries)
        return SettleManyResult(int(settled), [ordered[int(i)] for i in skipped])

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

    def settle(self, sender: TxSender, entry: Settlement, *, confirmations: int = 1) -> TxReceipt:
        """Pull one serve-first payment and pay the seller; the sender must be the seller or the operator."""
        return sender.transact(self.address, self.settle_data(entry), confirmations=confirmations)

    def settle_many(self, sender: TxSender, entries: Sequence[Settlement], *, confirmations: int = 1) -> TxReceipt:
        """Settle a batch; an entry whose pull fails or whose deadline passed is skipped (`settlements_in`)."""
        return sender.transact(self.address, self.settle_many_data(entries), confirmations=confirmations)

    def simulate_settle_many(self, sender: TxSender, entries: Sequence[Settlement]) -> SettleManyResult:
        """eth_call of settleMany as `sender`: which entries would settle now, and which would be skipped."""
        return self.decode_settle_many(entries, sender.call(self.address, self.settle_many_data(entries)))

    # -- events --------------------------------------------------------------------------

    def events_in(self, receipt: TxReceipt) -> list[EscrowEvent]:
        """The escrow events of one transaction, in log order."""
        events = []
        for log in receipt["logs"]:
            if to_checksum_address(log["address"]) == self.address and (event := decode_log(log)):
                events.append(event)
        return events

    def settlements_in(self, receipt: TxReceipt) -> list[SettlementEvent]:
        """The `Settled` and `SettlementSkipped` events of one transaction, in log order."""
        return [e for e in self._decoded(receipt) if isinstance(e, Settled | SettlementSkipped)]

    def payout_failures_in(self, receipt: TxReceipt) -> list[PayoutFailed]:
        """The `PayoutFailed` events of one transaction: their entries are Held again."""
        return [e for e in self._decoded(receipt) if isinstance(e, PayoutFailed)]

    def _decoded(self, receipt: TxReceipt) -> list[SettlementEvent | PayoutFailed]:
        return [
            event
            for log in receipt["logs"]
            if to_checksum_address(log["address"]) == self.address and (event := decode_settlement_log(log))
        ]

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

    def settlement_of(
        self, escrow_id: bytes, *, since: int, until: int | None = None, chunk: int = LOG_CHUNK
    ) -> Settled | None:
        """The Settled event of `escrow_id`, searched among blocks stamped from `since` to `until` (chain time).

        A settlement is mined after the buyer signed and before the deadline, so those bound the search.
        """
        latest = int(self.w3.eth.block_number)
        first = first_block_at(self.w3, since, latest=latest)
        last = latest if until is None else min(latest, first_block_at(self.w3, until, latest=latest))

        def fetch(start: int, end: int) -> Settled | None:
            logs = self.w3.eth.get_logs(
                {
                    "address": self.address,
                    "fromBlock": start,
                    "toBlock": end,
                    "topics": [HexBytes(SETTLED_TOPIC), HexBytes(escrow_id)],
                }
            )
            return next(
                (e for log in logs if isinstance(e := decode_settlement_log(log), Settled) and e.id == escrow_id), None
            )

        return find_in_chunks(fetch, first, last, chunk)

    def delivery_in(self, tx_hash: bytes, escrow_id: bytes) -> Delivered | None:
        """The Delivered event of `escrow_id` in transaction `tx_hash` (a seller's pointer, checked here)."""
        try:
            receipt = self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None
        return next((e for e in self.events_in(receipt) if isinstance(e, Delivered) and e.id == escrow_id), None)


def deploy(
    sender: TxSender, contract: str | dict[str, Any], *constructor_args: Any, confirmations: int = 1
) -> ChecksumAddress:
    """Deploy a shipped artifact (by name) or any artifact (the dict itself) from `sender`; returns its address.

    X402Escrow goes through `deploy_escrow`, to its one address (`registry.ESCROW_ADDRESS`);
    every other contract is created plainly.
    """
    if contract == "X402Escrow" and not constructor_args:
        return deploy_escrow(sender, confirmations=confirmations)
    artifact = load_artifact(contract) if isinstance(contract, str) else contract
    factory = sender.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    data = bytes(HexBytes(factory.constructor(*constructor_args).data_in_transaction))
    receipt = sender.transact(None, data, confirmations=confirmations)
    address = receipt["contractAddress"]
    if address is None:
        raise RuntimeError(f"deployment of {artifact.get('contractName', contract)} produced no contract address")
    return to_checksum_address(address)


def deploy_escrow(sender: TxSender, *, salt: bytes = ESCROW_SALT, confirmations: int = 1) -> ChecksumAddress:
    """Create the shipped X402Escrow through the CREATE2 proxy; returns its address.

    With the fixed salt the address is `registry.ESCROW_ADDRESS` on every chain. If the genuine
    contract is there already (anyone may have deployed it), nothing is sent. Raises ConfigError
    if the chain has no CREATE2 proxy or something else occupies the address.
    """
    w3 = sender.w3
    if not bytes(w3.eth.get_code(CREATE2_PROXY)):
        raise ConfigError(f"no CREATE2 deployment proxy at {CREATE2_PROXY} on chain {sender.chain_id}")
    init_code = escrow_init_code()
    address = create2_address(init_code, salt)
    runtime = bytes.fromhex(str(load_artifact("X402Escrow")["deployedBytecode"]).removeprefix("0x"))
    existing = bytes(w3.eth.get_code(address))
    if not existing:
        sender.transact(CREATE2_PROXY, salt + init_code, confirmations=confirmations)
        existing = bytes(w3.eth.get_code(address))
    if existing != runtime:
        raise ConfigError(f"the code at {address} is not the shipped X402Escrow runtime ({len(existing)} bytes)")
    return address


def deploy_local(sender: TxSender, *, confirmations: int = 1) -> tuple[ChecksumAddress, ChecksumAddress]:
    """X402Escrow, then TestUSDC ("USDC", version "2"), from `sender`: (escrow, token).

    The order of `ape run deploy` on a local network (the CREATE2 proxy call first, the token
    second), so a fresh chain and the same deployer give the same addresses either way.
    """
    escrow = deploy_escrow(sender, confirmations=confirmations)
    token = deploy(sender, "TestUSDC", "USDC", "2", confirmations=confirmations)
    return escrow, token
