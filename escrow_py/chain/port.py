"""`EscrowChain`: everything a role asks of the chain, in one Protocol.

The seller, the buyer, the keeper and the facilitator type against this port, never
against web3: the one implementation on a node is `chain.web3chain.Web3EscrowChain`
(built by `connect_chain`), and the unit tests run the roles on an in-memory one
(tests/fakes/chain.py) that models the escrow's and the token's rules.

Every method raises only the package's ChainError family (escrow_py.protocol.errors): RpcError
(RpcTimeout, InsufficientFunds, NonceConflict) when the node fails, ContractRevert when
a call or simulation reverts, TransactionFailed / TransactionTimeout for a sent
transaction. Nothing of web3, requests or the socket layer crosses this line.

Escrow-scoped methods take `escrow=`: the escrow the chain was built for when omitted
(the seller's and the facilitator's one contract), any escrow when given (the buyer pays
whichever genuine escrow an offer names, the keeper watches several).

The one clock is `next_block_time()`: the timestamp the block that includes a
transaction sent now will carry, which is what the contract and the token judge every
deadline and validity window by (chain/clock.py says why it is not the latest block's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from eth_typing import ChecksumAddress
from web3.types import TxReceipt

from escrow_py.chain.escrow import EscrowEvent, PayoutFailed, Settled, SettleManyResult, Settlement, SettlementEvent
from escrow_py.chain.genuine import EscrowCodeCheck
from escrow_py.chain.tx import OnSigned, SentTx, WatchReport
from escrow_py.protocol.eip3009 import TokenDomain
from escrow_py.protocol.terms import State, Terms

if TYPE_CHECKING:  # the wire's pydantic models and the x402 SDK: the keeper never loads them
    from escrow_py.protocol.wire import EscrowPayload

Block = int | str  # a block number, or a tag: "latest", "pending"


@dataclass(frozen=True, slots=True)
class BlockHead:
    """One block as a role needs it: where the chain is, and whether a reorg replaced it (`hash`)."""

    number: int
    hash: bytes
    timestamp: int
    gas_limit: int


# What a settlement's simulation gives when it passes (simulate_settle, PaymentLook.gas): an eth_call tells no gas.
SETTLE_SIMULATED = 0


@dataclass(frozen=True, slots=True)
class PaymentLook:
    """A payment's first look at the chain (EscrowChain.look): the escrow's state, the clock, and, when a
    check was asked for, the buyer's balance, the authorization's state and the simulation's outcome (a
    deposit's gas limit, margin included; SETTLE_SIMULATED for a settlement), each a value or the ChainError
    it met (ContractRevert for a simulation that reverts), so the caller judges them in its own order."""

    state: State
    now: int
    balance: int | Exception | None = None
    used: bool | Exception | None = None
    gas: int | Exception | None = None


class EscrowChain(Protocol):
    """The chain as seen by one signer (or none: a read-only buyer view) through one node."""

    # -- identity ----------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        """The chain's id (read once)."""
        ...

    @property
    def escrow(self) -> ChecksumAddress:
        """The escrow this chain was built for; ConfigError if it was built for none."""
        ...

    @property
    def sender_address(self) -> ChecksumAddress:
        """The address transactions are sent from; ConfigError if the chain has no signer."""
        ...

    # -- the one clock, and blocks ------------------------------------------------------------------

    def next_block_time(self) -> int:
        """The timestamp the next block will carry: the clock every deadline and window is judged by."""
        ...

    def block_time(self, block: Block) -> int:
        """The timestamp of a mined block (`block` a number, or "latest"): when something was judged."""
        ...

    def head(self) -> BlockHead:
        """The latest block."""
        ...

    def block_hash(self, number: int) -> bytes | None:
        """The hash of block `number` on the current chain; None past the head."""
        ...

    # -- reads ---------------------------------------------------------------------------------------

    def state_of(self, escrow_id: bytes, *, escrow: str | None = None, block: Block = "latest") -> State: ...

    def balance_of(self, token: str, holder: str, *, block: Block = "latest") -> int: ...

    def authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        """The token's ERC-3009 state of an authorization (nonce = escrow id): used or cancelled."""
        ...

    def token_domain(self, token: str) -> TokenDomain:
        """The token's EIP-712 domain from its name() and version(); ContractRevert if it cannot answer them."""
        ...

    def check_escrow(self, address: str) -> EscrowCodeCheck:
        """Whether `address` holds the genuine X402Escrow (chain.genuine); genuine verdicts are remembered."""
        ...

    def code_at(self, address: str) -> bytes:
        """The runtime code at `address` (empty for an account)."""
        ...

    def gas_balance(self) -> int:
        """The sender's ether balance in wei: what it can pay gas with."""
        ...

    def fees(self) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas) a transaction sent now would offer."""
        ...

    # -- simulations ---------------------------------------------------------------------------------

    def simulate_deposit(self, payload: EscrowPayload) -> int:
        """The deposit as the sender would send it, simulated: the gas limit to send it with
        (margin included); ContractRevert naming the rule it would break."""
        ...

    def simulate_settle(self, settlement: Settlement) -> int:
        """A serve-first `settle` of one payment as the sender would send it, simulated by eth_call (the pull
        the poster's settleMany will make): SETTLE_SIMULATED, or ContractRevert naming the rule it would break.
        No gas is estimated: the settlement goes out later in a batch that estimates its own."""
        ...

    def balance_and_next_block_time(self, token: str, holder: str) -> tuple[int, int]:
        """balance_of and next_block_time in one round trip: what a buyer reads before it signs."""
        ...

    def look(self, escrow_id: bytes, check: EscrowPayload | Settlement | None = None) -> PaymentLook:
        """state_of and next_block_time, and with `check` (a deposit's payload, or a settlement) balance_of
        the buyer, authorization_used and the simulation (simulate_deposit or simulate_settle), in one round
        trip: what a new payment's checks read. The state and the clock raise; the rest are handed back."""
        ...

    def call(self, to: str, data: bytes, *, block: Block = "latest") -> bytes:
        """eth_call as the sender (any contract, any calldata); ContractRevert when it reverts."""
        ...

    # -- sends (each waits for its receipt; a revert found by the gas estimate raises before sending) --

    def deposit(
        self, payload: EscrowPayload, *, gas: int | None = None, on_signed: OnSigned | None = None
    ) -> TxReceipt:
        """Deposit a buyer's signed payment; `on_signed` records each signed version before it leaves."""
        ...

    def deposit_intent(self, payload: EscrowPayload) -> str:
        """The intent (chain.tx.intent_of: target and calldata) the sender's NonceBook records the deposit of
        `payload` under: how a seller finds the deposit an earlier request or process sent for it."""
        ...

    def resume(self, tx_hash: bytes) -> TxReceipt | None:
        """Wait again for a transaction sent earlier; one the book holds at a nonce still unused is finished
        (sent again if the node lost it, repriced at its nonce while stuck). None when the node no longer knows
        it, it was never mined and its nonce went to another transaction (it can be sent anew)."""
        ...

    def finish_unmined(self) -> list[TxReceipt]:
        """The receipts of the sender's recorded transactions at nonces still unused (left by a process that
        died, or never broadcast), each finished at its own nonce: what a poster taking the key over does first."""
        ...

    def refund(self, terms: Terms, *, escrow: str | None = None) -> TxReceipt: ...

    def deliver_many(self, entries: Sequence[tuple[Terms, bytes]]) -> TxReceipt: ...

    def settle_many(self, entries: Sequence[Settlement]) -> TxReceipt:
        """One settleMany of serve-first payments (its entries in `Escrow.order_for_payout` order)."""
        ...

    def watch(self, depth: int) -> WatchReport:
        """Follow the sender's transactions through reorgs (TxSender.watch)."""
        ...

    # -- the keeper's lower level: sign and broadcast apart, so the bytes are recorded first --------------

    def sign(self, to: str, data: bytes, *, gas: int | None = None) -> SentTx:
        """Build and sign with the sender's next nonce, without broadcasting."""
        ...

    def replace(self, sent: SentTx) -> SentTx:
        """Re-sign `sent` with the same nonce and fees raised enough to replace it; not broadcast."""
        ...

    def resync_nonce(self) -> None:
        """Forget the cached nonce (after a failure that may have left it wrong)."""
        ...

    def request(self, method: str, params: list[Any]) -> Any:
        """One raw JSON-RPC request (the keeper's log scans, state-override calls and broadcasts);
        RpcError, or rpc.NodeError carrying the node's error object."""
        ...

    def requests(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Independent raw JSON-RPC requests in one round trip (a batch, so one backend of a load-balanced
        endpoint answers them all): each one's result, or the RpcError it met, in order."""
        ...

    # -- receipts and events -------------------------------------------------------------------------

    def receipt(self, tx_hash: bytes) -> TxReceipt | None:
        """The receipt of a mined transaction; None while it is not mined."""
        ...

    def events_in(self, receipt: TxReceipt, *, escrow: str | None = None) -> list[EscrowEvent]:
        """The escrow's Deposited / Delivered / Refunded events of one transaction, in log order."""
        ...

    def settlements_in(self, receipt: TxReceipt) -> list[SettlementEvent]:
        """The escrow's Settled / SettlementSkipped events of one transaction."""
        ...

    def payout_failures_in(self, receipt: TxReceipt) -> list[PayoutFailed]:
        """The escrow's PayoutFailed events of one transaction: their entries are Held again."""
        ...

    def delivered_hash(
        self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0, tx_hash: bytes | None = None
    ) -> bytes | None:
        """The delivery hash the seller committed for `escrow_id` (its Delivered event), if any: `tx_hash`
        (the seller's pointer) checked first, else the logs from chain time `since` on."""
        ...

    def settlement_of(self, escrow_id: bytes, *, escrow: str | None = None, since: int = 0) -> Settled | None:
        """The Settled event of a serve-first payment, searched from chain time `since` on."""
        ...


__all__ = ["Block", "BlockHead", "EscrowChain", "SettleManyResult"]
