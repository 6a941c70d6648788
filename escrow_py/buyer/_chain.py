"""The buyer's one way to the chain: every step that reads or writes the chain does it through a BuyerChain.

Everything the buyer asks of the chain is a method here (reads, the clock, the delivery and settlement
events, the buyer's own refund), so nothing else in escrow_py.buyer holds a Web3 connection; the names
and signatures are those of the shared chain port (escrow_py.chain's EscrowChain), which replaces it.
"""

from __future__ import annotations

import threading

from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.exceptions import BadFunctionCallOutput, ContractLogicError
from web3.types import TxReceipt

from escrow_py.buyer._errors import PaymentRefused
from escrow_py.chain import rpc
from escrow_py.chain.clock import next_block_time
from escrow_py.chain.escrow import Escrow, Settled
from escrow_py.chain.failures import typed_chain_errors
from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode, EscrowCodeCheck, check_escrow_code
from escrow_py.chain.signer import Signer
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.eip3009 import TokenDomain
from escrow_py.protocol.terms import State, Terms

# Wall clock (journal) against chain clock (blocks): how far apart they may be when bounding a log search.
CLOCK_SKEW = 3600


def delivered_hash(
    w3: Web3, escrow: str, escrow_id: bytes, *, since: int = 0, tx_hash: bytes | None = None
) -> bytes | None:
    """The delivery hash the seller posted on chain for `escrow_id` (its Delivered event), if any.

    `tx_hash`, the seller's pointer to its deliverMany, is checked first (one receipt);
    otherwise the logs are searched from chain time `since` on, in chunks a public RPC accepts.
    """
    contract = Escrow(w3, escrow)
    if tx_hash is not None and (event := contract.delivery_in(tx_hash, escrow_id)) is not None:
        return event.delivery_hash
    event = contract.delivery_of(escrow_id, since=since)
    return None if event is None else event.delivery_hash


class BuyerChain:
    """The buyer's view of the chain behind `rpc_url`: every call raises a typed ChainError, never web3's own.

    Every call ends within `rpc_timeout` seconds, retries included (escrow_py.chain.rpc.connect),
    so a node that hangs costs a payment that long, not web3's five retries of a per-attempt timeout.
    Genuine escrows are remembered per chain and address (X402Escrow's code cannot change); a
    refusal is not, so an address that gets the genuine code later is judged again.
    """

    def __init__(
        self, rpc_url: str, *, signer: Signer, w3: Web3 | None = None, rpc_timeout: float = rpc.DEFAULT_DEADLINE
    ) -> None:
        self.w3 = w3 or rpc.connect(rpc_url, deadline=rpc_timeout)
        self.signer = signer  # the buyer's key: its own refunds (recover())
        self._chain_id: int | None = None
        self._domains: dict[str, TokenDomain] = {}
        self._genuine: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            with typed_chain_errors("reading the chain id"):
                self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def now(self) -> int:
        """The latest block's timestamp: the clock the contract judged the chain's past by."""
        with typed_chain_errors("reading the latest block"):
            return rpc.latest_timestamp(self.w3)

    def next_block_time(self) -> int:
        """The timestamp the next block will carry: the clock a payment signed now is judged by."""
        with typed_chain_errors("reading the pending block"):
            return next_block_time(self.w3)

    def check_escrow(self, address: str) -> EscrowCodeCheck:
        """Whether `address` holds the genuine X402Escrow (escrow_py.chain.genuine), remembered once it does."""
        chain_id = self.chain_id
        key = (chain_id, address.lower())
        with self._lock:
            if key in self._genuine:
                return EscrowCodeCheck(to_checksum_address(address), chain_id, EscrowCode.GENUINE, ESCROW_CODE_HASH)
        with typed_chain_errors(f"reading the code at escrow {address}"):
            check = check_escrow_code(self.w3, address, chain_id=chain_id)
        if check.genuine:
            with self._lock:
                self._genuine.add(key)
        return check

    def domain(self, token: str) -> TokenDomain:
        """The token's EIP-712 domain; PaymentRefused (asset_not_erc3009) if `token` cannot answer it."""
        with self._lock:
            if token in self._domains:
                return self._domains[token]
        chain_id = self.chain_id
        with typed_chain_errors(f"reading the EIP-712 name and version of token {token}"):
            try:
                domain = Token(self.w3, token).domain(chain_id)
            except (BadFunctionCallOutput, ContractLogicError) as exc:  # no code there, or it reverts
                raise PaymentRefused(
                    "asset_not_erc3009",
                    f"the offer's asset {token} does not answer name() and version() ({type(exc).__name__}: {exc})",
                ) from exc
        with self._lock:
            self._domains[token] = domain
        return domain

    def balance_of(self, token: str, holder: str) -> int:
        with typed_chain_errors(f"reading the balance of {holder} in token {token}"):
            return Token(self.w3, token).balance_of(holder)

    def authorization_used(self, token: str, buyer: str, escrow_id: bytes) -> bool:
        """The token's ERC-3009 state of the buyer's authorization (nonce = escrow id): used or cancelled."""
        with typed_chain_errors(f"reading the authorization state of escrow 0x{escrow_id.hex()}"):
            return Token(self.w3, token).authorization_state(buyer, escrow_id)

    def state_of(self, escrow_id: bytes, *, escrow: str) -> State:
        with typed_chain_errors(f"reading the state of escrow 0x{escrow_id.hex()}"):
            return Escrow(self.w3, escrow).state_of(escrow_id)

    def delivered_hash(self, escrow_id: bytes, *, escrow: str, since: int, tx_hash: bytes | None) -> bytes | None:
        """The hash of the seller's Delivered event for `escrow_id` (see delivered_hash), None before it."""
        with typed_chain_errors(f"searching the Delivered event of escrow 0x{escrow_id.hex()}"):
            return delivered_hash(self.w3, escrow, escrow_id, since=since, tx_hash=tx_hash)

    def settlement_of(self, escrow_id: bytes, *, escrow: str, since: int) -> Settled | None:
        """The Settled event of a served-first payment, searched from chain time `since` on."""
        with typed_chain_errors(f"searching the Settled event of escrow 0x{escrow_id.hex()}"):
            return Escrow(self.w3, escrow).settlement_of(escrow_id, since=since)

    def refund(self, terms: Terms, *, escrow: str) -> TxReceipt:
        """Send Escrow.refund for `terms` from the buyer's key; its receipt once it is mined."""
        escrow_id = terms.escrow_id(self.chain_id, escrow)
        with typed_chain_errors(f"refunding escrow 0x{escrow_id.hex()}"):
            return Escrow(self.w3, escrow).refund(TxSender(self.w3, self.signer), terms)
