"""An in-memory EscrowChain for the unit tier: X402Escrow's and an ERC-3009 token's rules, no node.

    chain = FakeEscrowChain(operator=dev(OPERATOR).address)   # with a token "USDC"/"2": chain.token
    chain.mint(chain.token, buyer, 10**6)

What it models, with the contract's and TestUSDC's own error names (so a role's reaction
to a revert is the same here as on anvil; tests/contracts/test_chain_port_parity.py runs
one scenario against both, so the two cannot drift apart silently):
- deposit: ZeroAmount, ZeroSeller, DeadlinePassed, DeadlineTooFar, NotAContract,
  AlreadyDeposited, then the token's receiveWithAuthorization: CallerMustBePayee,
  AuthorizationNotYetValid, AuthorizationExpired, AuthorizationUsedOrCanceled,
  InvalidSignature (the EIP-712 signature over the terms' buyer, amount and id), InsufficientBalance;
- deliverMany (skips what is not Held or past its deadline), refund (NotHeld,
  RefundBeforeDeadline), settleMany (serve-first: skips with the contract's SkipReason);
- a clock: each transaction mines one block, stamped `next_block_time()`; `advance()` moves it;
- `down`: every call fails as a node that cannot be reached (RpcError).

It does not model gas, reorgs, nonces or raw transactions (`sign`, `replace`, `request`,
`call` raise NotImplementedError): the keeper's tier stays on anvil.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3.types import TxReceipt

from escrow_py.chain.escrow import (
    Delivered,
    Deposited,
    EscrowEvent,
    LogPosition,
    PayoutFailed,
    Refunded,
    Settled,
    Settlement,
    SettlementEvent,
    SettlementSkipped,
    SkipReason,
)
from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode, EscrowCodeCheck
from escrow_py.chain.port import SETTLE_SIMULATED, Block, BlockHead, EscrowChain, PaymentLook
from escrow_py.chain.tx import OnSigned, SentTx, WatchReport
from escrow_py.protocol.eip3009 import Authorization, TokenDomain, recover_signer
from escrow_py.protocol.errors import ContractRevert, RpcError
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, State, Terms
from escrow_py.protocol.wire import EscrowPayload

_T = TypeVar("_T")

CHAIN_ID = 84532
GAS = 120_000  # what every simulation answers: the fake does not meter gas


@dataclass
class FakeToken:
    name: str
    version: str
    balances: dict[str, int] = field(default_factory=dict)
    used: set[tuple[str, bytes]] = field(default_factory=set)


@dataclass
class _Tx:
    receipt: dict[str, Any]
    events: list[Any]


class FakeEscrowChain:
    """EscrowChain in memory (see the module docstring); thread-safe, as roles call it from worker threads."""

    def __init__(
        self, *, operator: str, escrow: str | None = None, start_time: int = 1_700_000_000, chain_id: int = CHAIN_ID
    ) -> None:
        self._chain_id = chain_id
        self._operator = to_checksum_address(operator)
        self._escrow = to_checksum_address(escrow or "0x" + keccak(b"fake escrow")[:20].hex())
        self.tokens: dict[ChecksumAddress, FakeToken] = {}
        self.states: dict[tuple[str, bytes], State] = {}
        self.blocks: list[tuple[bytes, int]] = [(keccak(b"genesis"), start_time)]
        self.clock = start_time + 1  # the wall clock the next block is stamped with, at least
        self.txs: dict[bytes, _Tx] = {}
        self.calls: dict[str, int] = {}  # how often each port method was asked: what a test can pin
        self.down = False
        self._lock = threading.RLock()
        self.token = self.add_token("USDC", "2")  # the default token; add_token makes more

    # -- set-up -------------------------------------------------------------------------------------

    def add_token(self, name: str = "USDC", version: str = "2") -> ChecksumAddress:
        address = to_checksum_address("0x" + keccak(f"token {len(self.tokens)}".encode())[:20].hex())
        self.tokens[address] = FakeToken(name, version)
        return address

    def mint(self, token: str, to: str, amount: int) -> None:
        balances = self.tokens[to_checksum_address(token)].balances
        balances[to_checksum_address(to)] = balances.get(to_checksum_address(to), 0) + amount

    def advance(self, seconds: int) -> None:
        """Let wall time pass: the next block is stamped at least this much later."""
        with self._lock:
            self.clock = max(self.clock, self.blocks[-1][1] + 1) + seconds

    def _enter(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.down:
            raise RpcError(f"{method}: fake node unreachable")

    # -- identity ------------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def escrow(self) -> ChecksumAddress:
        return self._escrow

    @property
    def sender_address(self) -> ChecksumAddress:
        return self._operator

    # -- the clock and blocks ------------------------------------------------------------------------

    def next_block_time(self) -> int:
        self._enter("next_block_time")
        with self._lock:
            return max(self.blocks[-1][1] + 1, self.clock)

    def block_time(self, block: Block) -> int:
        self._enter("block_time")
        with self._lock:
            return self.blocks[-1 if block == "latest" else int(block)][1]

    def head(self) -> BlockHead:
        self._enter("head")
        with self._lock:
            block_hash, timestamp = self.blocks[-1]
            return BlockHead(len(self.blocks) - 1, block_hash, timestamp, 30_000_000)

    def block_hash(self, number: int) -> bytes | None:
        self._enter("block_hash")
        with self._lock:
            return self.blocks[number][0] if number < len(self.blocks) else None

    # -- reads ---------------------------------------------------------------------------------------

    def _address(self, escrow: str | None) -> ChecksumAddress:
        return self._escrow if escrow is None else to_checksum_address(escrow)

    def state_of(self, escrow_id: bytes, *, escrow: str | None = None, block: Block = "latest") -> State:
        self._enter("state_of")
        with self._lock:
            return self.states.get((self._address(escrow), escrow_id), State.NONE)

    def _token(self, token: str) -> FakeToken:
        found = self.tokens.get(to_checksum_address(token))
        if found is None:  # eth_call to an address without code answers nothing
            raise ContractRevert("EmptyReturn", {"token": to_checksum_address(token), "answer": b""})
        return found

    def balance_of(self, token: str, holder: str, *, block: Block = "latest") -> int:
        self._enter("balance_of")
        with self._lock:
            return self._token(token).balances.get(to_checksum_address(holder), 0)

    def authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        self._enter("authorization_used")
        with self._lock:
            return (to_checksum_address(authorizer), nonce) in self._token(token).used

    def token_domain(self, token: str) -> TokenDomain:
        self._enter("token_domain")
        found = self._token(token)
        return TokenDomain(
            name=found.name,
            version=found.version,
            chain_id=self._chain_id,
            verifying_contract=to_checksum_address(token),
        )

    def check_escrow(self, address: str) -> EscrowCodeCheck:
        self._enter("check_escrow")
        checksummed = to_checksum_address(address)
        if checksummed == self._escrow:
            return EscrowCodeCheck(checksummed, self._chain_id, EscrowCode.GENUINE, ESCROW_CODE_HASH)
        verdict = EscrowCode.OTHER_CODE if checksummed in self.tokens else EscrowCode.NO_CODE
        return EscrowCodeCheck(checksummed, self._chain_id, verdict, None)

    def code_at(self, address: str) -> bytes:
        self._enter("code_at")
        return b"\x60" if to_checksum_address(address) in (self._escrow, *self.tokens) else b""

    def gas_balance(self) -> int:
        self._enter("gas_balance")
        return 10**18

    def fees(self) -> tuple[int, int]:
        self._enter("fees")
        return 2 * 10**9, 10**9

    # -- the contract's and the token's rules --------------------------------------------------------

    def _id(self, terms: Terms, escrow: str | None = None) -> bytes:
        return terms.escrow_id(self._chain_id, self._address(escrow))

    def _pull(self, terms: Terms, valid_after: int, valid_before: int, signature: bytes, now: int) -> None:
        """The token's receiveWithAuthorization as the escrow calls it (from = buyer, value = amount,
        nonce = id), checked in TestUSDC's order; applied only if every rule holds."""
        token = self._token(terms.token)
        escrow_id = self._id(terms)
        if now <= valid_after:
            raise ContractRevert("AuthorizationNotYetValid", {"validAfter": valid_after, "now_": now})
        if now >= valid_before:
            raise ContractRevert("AuthorizationExpired", {"validBefore": valid_before, "now_": now})
        if (terms.buyer, escrow_id) in token.used:
            raise ContractRevert("AuthorizationUsedOrCanceled", {"authorizer": terms.buyer, "nonce": escrow_id})
        signed = Authorization(
            from_=terms.buyer,
            to=self._escrow,
            value=terms.amount,
            valid_after=valid_after,
            valid_before=valid_before,
            nonce=escrow_id,
        )
        domain = TokenDomain(
            name=token.name, version=token.version, chain_id=self._chain_id, verifying_contract=terms.token
        )
        try:
            signer = recover_signer(domain, signed, signature)
        except ValueError:
            signer = None
        if signer != terms.buyer:
            raise ContractRevert("InvalidSignature", {"signer": terms.buyer})
        balance = token.balances.get(terms.buyer, 0)
        if balance < terms.amount:
            raise ContractRevert(
                "InsufficientBalance", {"account": terms.buyer, "balance": balance, "needed": terms.amount}
            )

    def _move(self, token: str, source: str, to: str, amount: int) -> None:
        balances = self.tokens[to_checksum_address(token)].balances
        balances[source] = balances.get(source, 0) - amount
        balances[to] = balances.get(to, 0) + amount

    def _check_deposit(self, payload: EscrowPayload, now: int) -> bytes:
        terms, auth = payload.terms, payload.authorization
        escrow_id = self._id(terms)
        if terms.amount == 0:
            raise ContractRevert("ZeroAmount", {})
        if int(terms.seller, 16) == 0:
            raise ContractRevert("ZeroSeller", {})
        if now >= terms.deadline:
            raise ContractRevert("DeadlinePassed", {"deadline": terms.deadline, "now_": now})
        if terms.deadline > now + MAX_DEADLINE_WINDOW:
            raise ContractRevert("DeadlineTooFar", {"deadline": terms.deadline, "max": now + MAX_DEADLINE_WINDOW})
        if terms.token not in self.tokens:
            raise ContractRevert("NotAContract", {"token": terms.token})
        state = self.states.get((self._escrow, escrow_id), State.NONE)
        if state is not State.NONE:
            raise ContractRevert("AlreadyDeposited", {"id": escrow_id, "state": int(state)})
        self._pull(terms, auth.valid_after, auth.valid_before, payload.signature, now)
        return escrow_id

    def _check_settlement(self, entry: Settlement) -> None:
        terms = entry.terms
        if entry.delivery_hash == bytes(32):
            raise ContractRevert("ZeroDeliveryHash", {"id": self._id(terms)})
        if terms.amount == 0:
            raise ContractRevert("ZeroAmount", {})
        if self._operator not in (terms.seller, terms.operator):
            raise ContractRevert(
                "NotSellerOrOperator", {"caller": self._operator, "seller": terms.seller, "operator": terms.operator}
            )

    # -- simulations ---------------------------------------------------------------------------------

    def simulate_deposit(self, payload: EscrowPayload) -> int:
        self._enter("simulate_deposit")
        with self._lock:
            self._check_deposit(payload, self._next_time())
        return GAS

    def simulate_settle(self, settlement: Settlement) -> int:
        self._enter("simulate_settle")
        with self._lock:
            now = self._next_time()
            self._check_settlement(settlement)
            if now >= settlement.terms.deadline:
                raise ContractRevert("DeadlinePassed", {"deadline": settlement.terms.deadline, "now_": now})
            auth = settlement.authorization
            self._pull(settlement.terms, auth.valid_after, auth.valid_before, settlement.signature, now)
        return SETTLE_SIMULATED

    def balance_and_next_block_time(self, token: str, holder: str) -> tuple[int, int]:
        return self.balance_of(token, holder), self.next_block_time()

    def look(self, escrow_id: bytes, check: EscrowPayload | Settlement | None = None) -> PaymentLook:
        state, now = self.state_of(escrow_id), self.next_block_time()
        if check is None:
            return PaymentLook(state, now)
        terms = check.terms
        if isinstance(check, Settlement):
            settlement = check
            simulate: Callable[[], int] = lambda: self.simulate_settle(settlement)  # noqa: E731
        else:
            payload = check
            simulate = lambda: self.simulate_deposit(payload)  # noqa: E731
        return PaymentLook(
            state,
            now,
            balance=_handed_back(lambda: self.balance_of(terms.token, terms.buyer)),
            used=_handed_back(lambda: self.authorization_used(terms.token, terms.buyer, escrow_id)),
            gas=_handed_back(simulate),
        )

    def call(self, to: str, data: bytes, *, block: Block = "latest") -> bytes:
        raise NotImplementedError("the fake chain runs no EVM: raw calls are for the anvil tiers")

    # -- sends ---------------------------------------------------------------------------------------

    def _next_time(self) -> int:
        return max(self.blocks[-1][1] + 1, self.clock)

    def _send(
        self, what: str, apply: Callable[[int, Callable[[Any], None]], None], on_signed: OnSigned | None = None
    ) -> TxReceipt:
        """Run `apply(block time, emit)` as one transaction mined in one new block; a revert mines nothing
        (the gas estimate found it first, as TxSender.send does)."""
        self._enter(what)
        with self._lock:
            tx_hash = os.urandom(32)
            if on_signed is not None:
                on_signed(SentTx(tx_hash, len(self.txs), {"intent": what}, b"fake:" + tx_hash, intent=what))
            now = self._next_time()
            number = len(self.blocks)
            block_hash = keccak(number.to_bytes(8, "big") + tx_hash)
            events: list[Any] = []
            at = LogPosition(number, block_hash, tx_hash, 0)

            def emit(make: Any) -> None:
                events.append(make(LogPosition(at.block_number, at.block_hash, at.tx_hash, len(events))))

            apply(now, emit)
            self.blocks.append((block_hash, now))
            receipt = {
                "transactionHash": tx_hash,
                "blockNumber": number,
                "blockHash": block_hash,
                "status": 1,
                "logs": [],
                "contractAddress": None,
            }
            self.txs[tx_hash] = _Tx(receipt, events)
            return cast(TxReceipt, receipt)

    def deposit(
        self, payload: EscrowPayload, *, gas: int | None = None, on_signed: OnSigned | None = None
    ) -> TxReceipt:
        def apply(now: int, emit: Callable[[Any], None]) -> None:
            escrow_id = self._check_deposit(payload, now)
            terms = payload.terms
            self.states[(self._escrow, escrow_id)] = State.HELD
            self.tokens[terms.token].used.add((terms.buyer, escrow_id))
            self._move(terms.token, terms.buyer, self._escrow, terms.amount)
            emit(lambda at: Deposited(escrow_id, terms, at))

        return self._send("deposit", apply, on_signed)

    def deposit_intent(self, payload: EscrowPayload) -> str:
        # No NonceBook here: an intent nothing was recorded under (a retry sends the deposit again).
        return f"deposit:{payload.terms.escrow_id(self.chain_id, self._escrow).hex()}"

    def resume(self, tx_hash: bytes) -> TxReceipt | None:
        self._enter("resume")
        found = self.txs.get(tx_hash)
        return cast(TxReceipt, found.receipt) if found is not None else None

    def finish_unmined(self) -> list[TxReceipt]:
        self._enter("finish_unmined")
        return []  # every send here is mined at once: nothing is ever left at an unused nonce

    def refund(self, terms: Terms, *, escrow: str | None = None) -> TxReceipt:
        address = self._address(escrow)

        def apply(now: int, emit: Callable[[Any], None]) -> None:
            escrow_id = self._id(terms, address)
            state = self.states.get((address, escrow_id), State.NONE)
            if state is not State.HELD:
                raise ContractRevert("NotHeld", {"id": escrow_id, "state": int(state)})
            if now < terms.deadline and self._operator not in (terms.seller, terms.operator):
                raise ContractRevert(
                    "RefundBeforeDeadline", {"deadline": terms.deadline, "now_": now, "caller": self._operator}
                )
            self.states[(address, escrow_id)] = State.REFUNDED
            self._move(terms.token, address, terms.buyer, terms.amount)
            emit(lambda at: Refunded(escrow_id, self._operator, at))

        return self._send("refund", apply)

    def deliver_many(self, entries: Sequence[tuple[Terms, bytes]]) -> TxReceipt:
        def apply(now: int, emit: Callable[[Any], None]) -> None:
            for terms, delivery_hash in entries:
                escrow_id = self._id(terms)
                if delivery_hash == bytes(32):
                    raise ContractRevert("ZeroDeliveryHash", {"id": escrow_id})
                if self._operator not in (terms.seller, terms.operator):
                    raise ContractRevert(
                        "NotSellerOrOperator",
                        {"caller": self._operator, "seller": terms.seller, "operator": terms.operator},
                    )
            for terms, delivery_hash in entries:
                escrow_id = self._id(terms)
                if self.states.get((self._escrow, escrow_id)) is not State.HELD or now >= terms.deadline:
                    continue  # skipped, not reverted: a racing poster, or a deadline that passed
                self.states[(self._escrow, escrow_id)] = State.RELEASED
                self._move(terms.token, self._escrow, terms.seller, terms.amount)
                emit(lambda at, i=escrow_id, h=delivery_hash: Delivered(i, h, at))

        return self._send("deliver_many", apply)

    def settle_many(self, entries: Sequence[Settlement]) -> TxReceipt:
        def apply(now: int, emit: Callable[[Any], None]) -> None:
            for entry in entries:
                self._check_settlement(entry)
            for entry in entries:
                terms, escrow_id = entry.terms, self._id(entry.terms)
                reason: SkipReason | None = None
                if now >= terms.deadline:
                    reason = SkipReason.DEADLINE_PASSED
                elif terms.token not in self.tokens:
                    reason = SkipReason.NOT_A_CONTRACT
                elif self.tokens[terms.token].balances.get(terms.buyer, 0) < terms.amount:
                    reason = SkipReason.INSUFFICIENT_BALANCE
                else:
                    auth = entry.authorization
                    try:
                        self._pull(terms, auth.valid_after, auth.valid_before, entry.signature, now)
                    except ContractRevert:
                        reason = SkipReason.PULL_FAILED
                if reason is not None:
                    emit(lambda at, i=escrow_id, r=reason: SettlementSkipped(i, r, at))
                    continue
                self.tokens[terms.token].used.add((terms.buyer, escrow_id))
                self._move(terms.token, terms.buyer, terms.seller, terms.amount)
                emit(lambda at, i=escrow_id, h=entry.delivery_hash: Settled(i, h, at))

        return self._send("settle_many", apply)

    def watch(self, depth: int) -> WatchReport:
        self._enter("watch")
        return WatchReport()  # no reorgs here

    def sign(self, to: str, data: bytes, *, gas: int | None = None) -> SentTx:
        raise NotImplementedError("the fake chain signs nothing: the keeper's tier runs on anvil")

    def replace(self, sent: SentTx) -> SentTx:
        raise NotImplementedError("the fake chain signs nothing: the keeper's tier runs on anvil")

    def resync_nonce(self) -> None:
        return None

    def request(self, method: str, params: list[Any]) -> Any:
        raise NotImplementedError(f"the fake chain answers no raw JSON-RPC ({method})")

    def requests(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        raise NotImplementedError(f"the fake chain answers no raw JSON-RPC ({[m for m, _ in calls]})")

    # -- receipts and events -------------------------------------------------------------------------

    def receipt(self, tx_hash: bytes) -> TxReceipt | None:
        self._enter("receipt")
        found = self.txs.get(tx_hash)
        return cast(TxReceipt, found.receipt) if found is not None else None

    def _events(self, receipt: TxReceipt) -> list[Any]:
        found = self.txs.get(bytes(receipt["transactionHash"]))
        return found.events if found is not None else []

    def events_in(self, receipt: TxReceipt, *, escrow: str | None = None) -> list[EscrowEvent]:
        return [e for e in self._events(receipt) if isinstance(e, Deposited | Delivered | Refunded)]

    def settlements_in(self, receipt: TxReceipt) -> list[SettlementEvent]:
        return [e for e in self._events(receipt) if isinstance(e, Settled | SettlementSkipped)]

    def payout_failures_in(self, receipt: TxReceipt) -> list[PayoutFailed]:
        return [e for e in self._events(receipt) if isinstance(e, PayoutFailed)]

    def delivered_hash(
        self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0, tx_hash: bytes | None = None
    ) -> bytes | None:
        self._enter("delivered_hash")
        with self._lock:
            for tx in self.txs.values():
                for event in tx.events:
                    if isinstance(event, Delivered) and event.id == escrow_id:
                        return event.delivery_hash
        return None

    def settlement_of(self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0) -> Settled | None:
        self._enter("settlement_of")
        with self._lock:
            for tx in self.txs.values():
                for event in tx.events:
                    if isinstance(event, Settled) and event.id == escrow_id:
                        return event
        return None


def as_port(chain: FakeEscrowChain) -> EscrowChain:
    """The fake as the port it stands in for (mypy checks here that it is one)."""
    return chain


def _handed_back(read: Callable[[], _T]) -> _T | Exception:
    """`read()`'s value, or the ChainError it raised (as EscrowChain.look hands them back)."""
    try:
        return read()
    except (ContractRevert, RpcError) as exc:
        return exc
