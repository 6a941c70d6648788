"""`Web3EscrowChain`: the one implementation of the EscrowChain port, on a JSON-RPC node.

    chain = connect_chain(rpc_url, deadline=5.0, escrow=ESCROW, signer=operator, book=store)
    gas = chain.simulate_deposit(payload)           # ContractRevert if it would revert
    receipt = chain.deposit(payload, gas=gas)

Seller, buyer, keeper and facilitator all build it with `connect_chain`; none of them
builds a Web3, an Escrow binding or a TxSender itself. The per-payment reads go
straight to the node as raw JSON-RPC (chain/rpc.py: about a quarter of web3's cost per
call), everything else through web3.

This is where web3.py's, requests' and the socket layer's exceptions stop: every method that
talks to the node runs inside `typed_chain_errors`, so a caller sees RpcError (the node),
ContractRevert (a revert), TransactionFailed or TransactionTimeout, each naming what it was
doing, and nothing else of the chain's (chain/failures.py; tests/chain/test_web3chain_boundary.py).
The raw `request` door keeps the node's error object as rpc.NodeError (an RpcError).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.types import BlockIdentifier, TxReceipt

from escrow_py.chain import clock, rpc
from escrow_py.chain.escrow import Escrow, EscrowEvent, PayoutFailed, Settled, Settlement, SettlementEvent
from escrow_py.chain.failures import CHAIN_FAILURES, as_chain_error, typed_chain_errors
from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode, EscrowCodeCheck, check_escrow_code
from escrow_py.chain.port import SETTLE_SIMULATED, Block, BlockHead, PaymentLook
from escrow_py.chain.signer import Signer
from escrow_py.chain.token import Token
from escrow_py.chain.tx import (
    GAS_MARGIN,
    NonceBook,
    OnSigned,
    SentTx,
    TxSender,
    WatchReport,
    intent_of,
)
from escrow_py.protocol.eip3009 import TokenDomain
from escrow_py.protocol.errors import ConfigError, EscrowError, RpcError
from escrow_py.protocol.terms import State, Terms

if TYPE_CHECKING:  # the wire's pydantic models and the x402 SDK: the keeper never loads them
    from escrow_py.protocol.wire import EscrowPayload

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="Web3EscrowChain")

# Seconds a pending block's base fee read with the clock prices the transactions sent after it: the base fee
# moves at most 12.5% a block, and a transaction offers twice it plus the tip (TxSender.fees).
BASE_FEE_FRESH = 2.0
# Deposit calldata kept per simulated payload, for the deposit that follows its simulation.
CALLDATA_KEPT = 256


def _typed(what: str) -> Callable[[Callable[Concatenate[_Self, _P], _T]], Callable[Concatenate[_Self, _P], _T]]:
    """Run the method inside typed_chain_errors(what): the boundary where web3's exceptions end."""

    def wrap(method: Callable[Concatenate[_Self, _P], _T]) -> Callable[Concatenate[_Self, _P], _T]:
        @functools.wraps(method)
        def typed(self: _Self, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            with typed_chain_errors(what):
                return method(self, *args, **kwargs)

        return typed

    return wrap


def connect_chain(
    rpc_url: str,
    *,
    deadline: float = rpc.DEFAULT_DEADLINE,
    escrow: str | None = None,
    signer: Signer | None = None,
    book: NonceBook | None = None,
    watch: bool = False,
    confirmations: int = 1,
    tx_timeout: float = 120.0,
    reprice_after: float | None = None,
    w3: Web3 | None = None,
) -> Web3EscrowChain:
    """The chain behind `rpc_url`, every call of which ends within `deadline` seconds (rpc.connect).

    `escrow`: the contract escrow-scoped calls default to. `signer`: the key transactions are sent
    from, through one TxSender (nonces in `book` when given, shared by every process on it; `watch`:
    follow them through reorgs). Each transaction waits for `confirmations` blocks, is repriced after
    `reprice_after` seconds stuck, and given up after `tx_timeout`. `w3`: an existing connection.
    """
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0:
        raise ConfigError(f"the RPC deadline must be a number of seconds > 0, got {deadline!r}")
    connection = w3 if w3 is not None else rpc.connect(rpc_url, deadline=deadline)
    sender = TxSender(connection, signer, watch=watch, book=book) if signer is not None else None
    return Web3EscrowChain(
        connection,
        escrow=escrow,
        sender=sender,
        confirmations=confirmations,
        tx_timeout=tx_timeout,
        reprice_after=reprice_after,
    )


class Web3EscrowChain:
    """EscrowChain on a node (see the module docstring). Thread-safe: roles call it from worker threads.

    `w3`, `sender` and `binding()` are the web3 level underneath, for tooling and tests; roles use the
    port's methods only.
    """

    def __init__(
        self,
        w3: Web3,
        *,
        escrow: str | None = None,
        sender: TxSender | None = None,
        confirmations: int = 1,
        tx_timeout: float = 120.0,
        reprice_after: float | None = None,
    ) -> None:
        self.w3 = w3
        self._sender = sender
        self._escrow = to_checksum_address(escrow) if escrow is not None else None
        self.confirmations = confirmations
        self.tx_timeout = tx_timeout
        self.reprice_after = reprice_after
        self._chain_id: int | None = None
        self._lock = threading.Lock()
        self._bindings: dict[str, Escrow] = {}
        self._tokens: dict[str, Token] = {}
        self._domains: dict[str, TokenDomain] = {}
        self._genuine: set[str] = set()
        # The deposit calldata of payloads simulated lately, by the payload object itself (a frozen model),
        # so that a deposit after its simulation sends the bytes encoded for it, encoded once.
        self._calldata: collections.OrderedDict[int, tuple[EscrowPayload, bytes]] = collections.OrderedDict()
        # The base fee of the pending block the clock read last, and when (monotonic): a transaction sent
        # soon after prices from it rather than reading a block again (TxSender.fees).
        self._base_fee: tuple[float, int] | None = None

    # -- identity and the web3 level ---------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            with typed_chain_errors("reading the chain id"):
                self._chain_id = int(str(rpc.request(self.w3, "eth_chainId", [])), 16)
        return self._chain_id

    @property
    def escrow(self) -> ChecksumAddress:
        if self._escrow is None:
            raise ConfigError("this chain was built for no escrow: name one (escrow=...)")
        return self._escrow

    @property
    def sender(self) -> TxSender:
        if self._sender is None:
            raise ConfigError("this chain was built without a signer: it can read, not send")
        return self._sender

    @property
    def sender_address(self) -> ChecksumAddress:
        return self.sender.address

    def binding(self, escrow: str | None = None) -> Escrow:
        """The web3 binding of `escrow` (the chain's own when None): calldata, events, log searches."""
        address = self.escrow if escrow is None else to_checksum_address(escrow)
        with self._lock:
            found = self._bindings.get(address)
            if found is None:
                found = self._bindings[address] = Escrow(self.w3, address)
            return found

    def _token(self, token: str) -> Token:
        address = to_checksum_address(token)
        with self._lock:
            found = self._tokens.get(address)
            if found is None:
                found = self._tokens[address] = Token(self.w3, address)
            return found

    # -- the one clock, and blocks ----------------------------------------------------------------

    @_typed("reading the pending block's time")
    def next_block_time(self) -> int:
        now, base_fee = clock.next_block(self.w3)
        self._saw_base_fee(base_fee)
        return now

    def _saw_base_fee(self, base_fee: int | None) -> None:
        """Keep the pending block's base fee the clock read, for a transaction sent soon after."""
        if base_fee is not None:
            self._base_fee = (time.monotonic(), base_fee)

    def _fresh_base_fee(self) -> int | None:
        """The base fee the clock read within BASE_FEE_FRESH seconds, if any (None: fees read their own)."""
        seen = self._base_fee
        return seen[1] if seen is not None and time.monotonic() - seen[0] <= BASE_FEE_FRESH else None

    @_typed("reading a block's time")
    def block_time(self, block: Block) -> int:
        return clock.block_time(self.w3, block)

    @_typed("reading the latest block")
    def head(self) -> BlockHead:
        block = rpc.request(self.w3, "eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise RpcError(f"eth_getBlockByNumber(latest) returned no block: {block!r}")
        try:
            return BlockHead(
                int(str(block["number"]), 16),
                bytes.fromhex(str(block["hash"])[2:]),
                int(str(block["timestamp"]), 16),
                int(str(block["gasLimit"]), 16),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RpcError(f"eth_getBlockByNumber(latest) returned a malformed block: {exc}") from None

    @_typed("reading a block's hash")
    def block_hash(self, number: int) -> bytes | None:
        block = rpc.request(self.w3, "eth_getBlockByNumber", [hex(number), False])
        return bytes.fromhex(str(block["hash"])[2:]) if isinstance(block, dict) else None

    # -- reads ------------------------------------------------------------------------------------

    @_typed("reading an escrow's state")
    def state_of(self, escrow_id: bytes, *, escrow: str | None = None, block: Block = "latest") -> State:
        return self.binding(escrow).state_of(escrow_id, block=block)

    @_typed("reading a token balance")
    def balance_of(self, token: str, holder: str, *, block: Block = "latest") -> int:
        return self._token(token).balance_of(holder, block)

    @_typed("reading an authorization's state")
    def authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        return self._token(token).authorization_state(authorizer, nonce)

    @_typed("reading the token's EIP-712 name and version")
    def token_domain(self, token: str) -> TokenDomain:
        address = to_checksum_address(token)
        with self._lock:
            if address in self._domains:
                return self._domains[address]
        domain = self._token(address).domain(self.chain_id)
        with self._lock:
            self._domains[address] = domain
        return domain

    @_typed("reading the code at an escrow")
    def check_escrow(self, address: str) -> EscrowCodeCheck:
        checksummed = to_checksum_address(address)
        chain_id = self.chain_id
        with self._lock:
            if checksummed in self._genuine:  # X402Escrow's code cannot change: a genuine verdict stands
                return EscrowCodeCheck(checksummed, chain_id, EscrowCode.GENUINE, ESCROW_CODE_HASH)
        check = check_escrow_code(self.w3, checksummed, chain_id=chain_id)
        if check.genuine:
            with self._lock:
                self._genuine.add(checksummed)
        return check

    @_typed("reading the code at an address")
    def code_at(self, address: str) -> bytes:
        code = rpc.request(self.w3, "eth_getCode", [to_checksum_address(address), "latest"])
        return bytes.fromhex(str(code or "0x")[2:])

    @_typed("reading the sender's gas balance")
    def gas_balance(self) -> int:
        return self.sender.balance()

    @_typed("reading the fees")
    def fees(self) -> tuple[int, int]:
        return self.sender.fees()

    # -- simulations ------------------------------------------------------------------------------

    def _deposit_data(self, payload: EscrowPayload) -> bytes:
        """The deposit's calldata, encoded once per payload object (simulated, then sent)."""
        with self._lock:
            known = self._calldata.get(id(payload))
            if known is not None and known[0] is payload:
                return known[1]
        data = self.binding().deposit_data(payload.terms, payload.authorization, payload.signature)
        with self._lock:
            self._calldata[id(payload)] = (payload, data)  # the payload is kept: its id is not reused meanwhile
            while len(self._calldata) > CALLDATA_KEPT:
                self._calldata.popitem(last=False)
        return data

    @_typed("simulating the deposit")
    def simulate_deposit(self, payload: EscrowPayload) -> int:
        return int(self.sender.estimate_gas(self.escrow, self._deposit_data(payload)) * GAS_MARGIN)

    @_typed("simulating the settlement")
    def simulate_settle(self, settlement: Settlement) -> int:
        self.sender.call(self.escrow, self.binding().settle_data(settlement))
        return SETTLE_SIMULATED

    @_typed("reading a token balance and the pending block")
    def balance_and_next_block_time(self, token: str, holder: str) -> tuple[int, int]:
        balance, pending = rpc.batch(self.w3, [self._token(token).balance_request(holder), clock.NEXT_BLOCK_TIME])
        return Token.balance_from(_raised(balance)), clock.next_block_time_from(self.w3, pending)

    @_typed("reading a payment's escrow state, clock, balance and authorization, and simulating it")
    def look(self, escrow_id: bytes, check: EscrowPayload | Settlement | None = None) -> PaymentLook:
        binding = self.binding()
        requests = [binding.state_request(escrow_id), clock.NEXT_BLOCK_TIME]
        if check is not None:
            terms, auth = check.terms, check.authorization
            if isinstance(check, Settlement):
                simulation = self.sender.call_request(self.escrow, binding.settle_data(check))
            else:
                data = binding.deposit_data(terms, auth, check.signature)
                simulation = self.sender.estimate_gas_request(self.escrow, data)
            token = self._token(terms.token)
            requests += [
                token.balance_request(terms.buyer),
                token.authorization_state_request(terms.buyer, escrow_id),
                simulation,
            ]
        answers = rpc.batch(self.w3, requests)
        if isinstance(answers[0], Exception):
            raise answers[0]
        now, base_fee = clock.next_block_from(self.w3, answers[1])
        self._saw_base_fee(base_fee)
        look = PaymentLook(Escrow.state_from(answers[0]), now)
        if check is None:
            return look
        balance, used, gas = answers[2:]
        if isinstance(check, Settlement):
            simulated = _handed_back(lambda: (self.sender.output_from(gas), SETTLE_SIMULATED)[1])
        else:
            simulated = _handed_back(lambda: int(self.sender.gas_from(gas) * GAS_MARGIN))
        return PaymentLook(
            look.state,
            look.now,
            balance=_handed_back(lambda: Token.balance_from(_raised(balance))),
            used=_handed_back(lambda: Token.authorization_state_from(_raised(used))),
            gas=simulated,
        )

    @_typed("simulating a call")
    def call(self, to: str, data: bytes, *, block: Block = "latest") -> bytes:
        return self.sender.call(to, data, block=block if isinstance(block, int) else cast(BlockIdentifier, block))

    # -- sends ------------------------------------------------------------------------------------

    def _transact(
        self, to: str, data: bytes, *, gas: int | None = None, on_signed: OnSigned | None = None
    ) -> TxReceipt:
        return self.sender.transact(
            to,
            data,
            gas=gas,
            confirmations=self.confirmations,
            timeout=self.tx_timeout,
            reprice_after=self.reprice_after,
            on_signed=on_signed,
            base_fee=self._fresh_base_fee(),
        )

    @_typed("depositing")
    def deposit(
        self, payload: EscrowPayload, *, gas: int | None = None, on_signed: OnSigned | None = None
    ) -> TxReceipt:
        return self._transact(self.escrow, self._deposit_data(payload), gas=gas, on_signed=on_signed)

    def deposit_intent(self, payload: EscrowPayload) -> str:
        return intent_of(self.escrow, self._deposit_data(payload))

    @_typed("waiting for a transaction sent earlier")
    def resume(self, tx_hash: bytes) -> TxReceipt | None:
        sender = self.sender
        if sender.receipt(tx_hash) is None and sender.book is not None:
            unmined = sender.book.unmined(sender.address, sender.confirmed_nonce())
            mine = next((s for s in unmined if s.tx_hash == tx_hash), None)
            if mine is not None:
                # Its nonce is still unused, whoever signed it (maybe a replica that died): finish that one, sent
                # again if the node lost it and repriced at its nonce while stuck, rather than sign another.
                versions = [s for s in unmined if (s.nonce, s.intent) == (mine.nonce, mine.intent)]
                return sender.finish(versions, confirmations=self.confirmations, timeout=self.tx_timeout,
                                     reprice_after=self.reprice_after)  # fmt: skip
        if sender.receipt(tx_hash) is None and not sender.known_to_node(tx_hash):
            return None
        sent = sender.followed(tx_hash)
        if sent is None:  # sent by an earlier process: no signed copy to reprice, wait for it as it is
            return sender.wait(tx_hash, confirmations=self.confirmations, timeout=self.tx_timeout)
        return sender.confirm(
            sent, confirmations=self.confirmations, timeout=self.tx_timeout, reprice_after=self.reprice_after
        )

    @_typed("finishing transactions left in flight")
    def finish_unmined(self) -> list[TxReceipt]:
        return self.sender.finish_unmined(
            confirmations=self.confirmations, timeout=self.tx_timeout, reprice_after=self.reprice_after
        )

    @_typed("refunding")
    def refund(self, terms: Terms, *, escrow: str | None = None) -> TxReceipt:
        binding = self.binding(escrow)
        return self._transact(binding.address, binding.refund_data(terms))

    @_typed("posting deliveries")
    def deliver_many(self, entries: Sequence[tuple[Terms, bytes]]) -> TxReceipt:
        return self._transact(self.escrow, self.binding().deliver_many_data(entries))

    @_typed("settling serve-first payments")
    def settle_many(self, entries: Sequence[Settlement]) -> TxReceipt:
        return self._transact(self.escrow, self.binding().settle_many_data(entries))

    @_typed("following sent transactions")
    def watch(self, depth: int) -> WatchReport:
        return self.sender.watch(depth)

    @_typed("signing a transaction")
    def sign(self, to: str, data: bytes, *, gas: int | None = None) -> SentTx:
        return self.sender.sign(to, data, gas=gas)

    @_typed("re-signing a stuck transaction")
    def replace(self, sent: SentTx) -> SentTx:
        return self.sender.replace(sent)

    def resync_nonce(self) -> None:
        self.sender.resync_nonce()

    def request(self, method: str, params: list[Any]) -> Any:
        # Not typed_chain_errors: the node's own error object stays an rpc.NodeError (the keeper reads its
        # revert data); only what the transport raises besides is mapped.
        try:
            return rpc.request(self.w3, method, params)
        except EscrowError:
            raise
        except CHAIN_FAILURES as exc:
            raise as_chain_error(exc, f"JSON-RPC {method}") from exc

    def requests(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        # rpc.batch types every failure as an RpcError in its slot; it raises none.
        return rpc.batch(self.w3, [rpc.Request(method, params) for method, params in calls])

    # -- receipts and events ----------------------------------------------------------------------

    @_typed("reading a receipt")
    def receipt(self, tx_hash: bytes) -> TxReceipt | None:
        if self._sender is not None:
            return self.sender.receipt(tx_hash)
        try:
            return self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def events_in(self, receipt: TxReceipt, *, escrow: str | None = None) -> list[EscrowEvent]:
        return self.binding(escrow).events_in(receipt)

    def settlements_in(self, receipt: TxReceipt) -> list[SettlementEvent]:
        return self.binding().settlements_in(receipt)

    def payout_failures_in(self, receipt: TxReceipt) -> list[PayoutFailed]:
        return self.binding().payout_failures_in(receipt)

    @_typed("searching the Delivered event")
    def delivered_hash(
        self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0, tx_hash: bytes | None = None
    ) -> bytes | None:
        binding = self.binding(escrow)
        if tx_hash is not None and (event := binding.delivery_in(tx_hash, escrow_id)) is not None:
            return event.delivery_hash
        found = binding.delivery_of(escrow_id, since=since)
        return None if found is None else found.delivery_hash

    @_typed("searching the Settled event")
    def settlement_of(self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0) -> Settled | None:
        return self.binding(escrow).settlement_of(escrow_id, since=since)


def _raised(answer: object) -> object:
    """A batched answer, or the exception it is raised."""
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _handed_back(read: Callable[[], _T]) -> _T | Exception:
    """`read()`'s value, or the ChainError it raised (web3's own typed as the boundary types them)."""
    try:
        return read()
    except EscrowError as exc:
        return exc
    except CHAIN_FAILURES as exc:
        return as_chain_error(exc, "a payment's first look")
