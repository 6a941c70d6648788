"""Small helpers shared by the test suites: terms, signed deposits, cancellations, expected reverts.

    terms = make_terms(chain, amount=10_000)               # buyer/seller/operator = dev accounts
    auth, sig = sign_deposit(chain, terms)                  # the buyer's ReceiveWithAuthorization
    receipt = deposit(chain, terms)                         # signed and deposited by the seller
    with expect_revert("NotHeld", state=State.RELEASED):    # the decoded custom error and its values
        chain.escrow.deliver(chain.sender(SELLER), terms, h)

Everything works on the `chain` fixture of tests/fixtures/chain.py; senders are made per
call because TxSender caches nonces.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import pytest
from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address

# The role indexes, re-exported: tests take them from here or from fixtures.chain alike.
from fixtures.chain import BUYER as BUYER
from fixtures.chain import BUYER2 as BUYER2
from fixtures.chain import DEPLOYER as DEPLOYER
from fixtures.chain import OPERATOR as OPERATOR
from fixtures.chain import SELLER as SELLER
from fixtures.chain import SELLER2 as SELLER2
from fixtures.chain import STRANGER as STRANGER
from web3 import Web3
from web3.types import RPCEndpoint, TxReceipt

from escrow_devtools.anvil import dev_signer
from escrow_py.chain.clock import next_block_time
from escrow_py.chain.signer import LocalSigner, Signer
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender, decode_revert
from escrow_py.protocol.eip3009 import (
    RECEIVE_WITH_AUTHORIZATION,
    Authorization,
    authorization_for,
    cancel_typed_data,
    sign_authorization,
    typed_data,
)
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.terms import Terms, request_hash

if TYPE_CHECKING:
    from fixtures.chain import Chain


DEFAULT_AMOUNT = 10_000  # 0.01 USDC
DEFAULT_WINDOW = 3600


@cache
def dev(index: int) -> LocalSigner:
    """anvil dev account `index`, derived once (a mnemonic derivation costs milliseconds)."""
    return dev_signer(index)


def address(index: int) -> ChecksumAddress:
    """The address of anvil dev account `index`."""
    return dev(index).address


def make_terms(
    chain: Chain,
    *,
    buyer: int = BUYER,
    seller: int = SELLER,
    operator: int = OPERATOR,
    token: str | None = None,
    amount: int = DEFAULT_AMOUNT,
    deadline: int | None = None,
    window: int = DEFAULT_WINDOW,
    salt: bytes | None = None,
) -> Terms:
    """Terms between dev accounts, on the chain's TestUSDC unless `token` is given.

    The deadline defaults to `window` seconds after the time the next block will carry (on an idle chain
    the latest block's time is stale, and a short window counted from it may be over when mined); the salt
    is random.
    """
    return Terms(
        buyer=address(buyer),
        seller=address(seller),
        operator=address(operator),
        token=to_checksum_address(token or chain.token.address),
        amount=amount,
        deadline=next_block_time(chain.w3) + window if deadline is None else deadline,
        request_hash=request_hash("GET", "https://api.example/data"),
        salt=salt if salt is not None else os.urandom(32),
    )


def offline_terms(amount: int, deadline: int, salt: bytes = b"\0" * 32) -> Terms:
    """Terms between dev accounts 1 to 4 (buyer, seller, operator, token) for a test with no chain."""
    return Terms(
        buyer=dev(1).address,
        seller=dev(2).address,
        operator=dev(3).address,
        token=dev(4).address,
        amount=amount,
        deadline=deadline,
        request_hash=b"\0" * 32,
        salt=salt,
    )


def sign_deposit(
    chain: Chain,
    terms: Terms,
    *,
    signer: Signer | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
) -> tuple[Authorization, bytes]:
    """The authorization that deposits `terms` and its signature by the buyer (or by `signer`).

    Signing with another key goes through the same typed data, so the result is a
    well-formed signature that the token must reject.
    """
    auth = authorization_for(
        terms,
        chain.escrow.address,
        chain.escrow.chain_id,
        valid_after,
        terms.deadline if valid_before is None else valid_before,
    )
    domain = token_at(chain, terms.token).domain()
    if signer is None:
        signer = _signer_for(terms.buyer)
        return auth, sign_authorization(signer, domain, auth)
    # sign_authorization refuses a signer that is not the payer; a forged signature is the point here.
    return auth, signer.sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, domain, auth))


def token_at(chain: Chain, address: str) -> Token:
    """The binding of the token at `address`, built once per chain and address (building web3's contract object
    costs 3 ms of CPU); it keeps no chain state, so it outlives the rollbacks between tests."""
    return _token(chain.w3, to_checksum_address(address))


@cache
def _token(w3: Web3, address: str) -> Token:
    return Token(w3, address)


def _signer_for(who: str) -> Signer:
    for index in range(10):
        candidate = dev(index)
        if candidate.address == who:
            return candidate
    raise ValueError(f"{who} is not an anvil dev account")


def deposit(chain: Chain, terms: Terms, *, submitter: int = SELLER) -> TxReceipt:
    """Sign `terms` as the buyer and deposit them from dev account `submitter`."""
    auth, signature = sign_deposit(chain, terms)
    return chain.escrow.deposit(chain.sender(submitter), terms, auth, signature)


def cancel_authorization(chain: Chain, terms: Terms, *, submitter: int = STRANGER) -> TxReceipt:
    """The buyer cancels the authorization that would deposit `terms` (anyone may submit it)."""
    token = token_at(chain, terms.token)
    nonce = chain.escrow.id_of(terms)
    signature = _signer_for(terms.buyer).sign_typed_data(cancel_typed_data(token.domain(), terms.buyer, nonce))
    data = token.cancel_authorization_data(terms.buyer, nonce, signature)
    return chain.sender(submitter).transact(token.address, data)


def send_at(chain: Chain, who: int, data: bytes, timestamp: int, *, to: str | None = None) -> TxReceipt:
    """Mine `data` from dev account `who` in a block stamped exactly `timestamp`.

    The gas is fixed because a gas estimate simulates on the latest block's time, not
    on `timestamp`; a revert therefore surfaces as TransactionFailed from the receipt.
    """
    sender = chain.sender(who)
    chain.set_next_timestamp(timestamp)
    sent = sender.send(to or chain.escrow.address, data, gas=2_000_000)
    receipt = sender.wait(sent.tx_hash)
    assert int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]) == timestamp
    return receipt


def mine_at(
    chain: Chain,
    who: int | TxSender,
    data: bytes,
    timestamp: int,
    *,
    to: str | None = None,
    check_time: bool = True,
    gas: int = 3_000_000,
) -> tuple[TxReceipt, ContractRevert | None]:
    """Like `send_at`, but a revert is returned, decoded from the mined transaction's own trace.

    The trace is of the block as mined, so the error's values (e.g. `now_`) are those
    of `timestamp` exactly; None when the transaction succeeded. `who` is a dev account
    index or a sender to reuse (a long sequence saves the nonce look-ups). The gas limit is
    fixed (`gas`), since an estimate would simulate at the latest block's time.
    """
    sender = chain.sender(who) if isinstance(who, int) else who
    chain.set_next_timestamp(timestamp)
    sent = sender.send(to or chain.escrow.address, data, gas=gas)
    while (receipt := sender.receipt(sent.tx_hash)) is None:
        time.sleep(0.005)
    if check_time:
        assert int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]) == timestamp
    if receipt["status"] == 1:
        return receipt, None
    trace = chain.w3.provider.make_request(
        RPCEndpoint("debug_traceTransaction"), ["0x" + bytes(sent.tx_hash).hex(), {"tracer": "callTracer"}]
    )["result"]
    return receipt, decode_revert(bytes.fromhex(str(trace.get("output", "0x"))[2:]))


def rpc(chain: Chain, method: str, params: list[Any]) -> Any:
    """One raw JSON-RPC call to the test node (anvil's own methods included); its `result`."""
    return chain.w3.provider.make_request(RPCEndpoint(method), params).get("result")


@contextmanager
def no_automine(chain: Chain) -> Iterator[None]:
    """Blocks only when the test mines them: a transaction stays pending as long as it likes."""
    rpc(chain, "evm_setAutomine", [False])
    try:
        yield
    finally:
        rpc(chain, "evm_setAutomine", [True])
        rpc(chain, "evm_mine", [])


def pending_of(chain: Chain, who: str) -> list[dict[str, Any]]:
    """The node's pending transactions from `who`."""
    pool = rpc(chain, "txpool_content", [])["pending"]
    by_sender: dict[str, dict[str, Any]] = next(
        (txs for sender, txs in pool.items() if sender.lower() == who.lower()), {}
    )
    return list(by_sender.values())


def until(what: str, condition: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll `condition` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def clock_at(chain: Chain, timestamp: int) -> None:
    """Mine an empty block at `timestamp`: calls and gas estimates then simulate at exactly that time."""
    chain.mine(timestamp)


def _normal(value: Any) -> Any:
    """Addresses compare whatever their case: decoded errors give them in lower case."""
    if isinstance(value, str) and is_address(value):
        return to_checksum_address(value)
    return value


@dataclass
class Caught:
    """Filled by `expect_revert` with the ContractRevert once the block has raised it."""

    revert: ContractRevert | None = field(default=None)


@contextmanager
def expect_revert(name: str, **expected: Any) -> Iterator[Caught]:
    """Assert the block raises ContractRevert `name`, and that each given argument has the given value.

    Arguments not given are not checked; all of them are available on the yielded `Caught`.
    """
    caught = Caught()
    with pytest.raises(ContractRevert) as info:
        yield caught
    revert = info.value
    caught.revert = revert
    assert revert.name == name, f"expected {name}, got {revert}"
    for key, value in expected.items():
        assert key in revert.args_by_name, f"{revert} has no argument {key!r}"
        assert _normal(revert.args_by_name[key]) == _normal(value), (
            f"{revert}: {key} is {revert.args_by_name[key]!r}, not {value!r}"
        )


# Circle's FiatToken roles on the test chain: the proxy admin, and the owner who also mints.
FIAT_ADMIN, FIAT_OWNER = 8, 9


def deploy_fiat_token(chain: Chain, *, fund: tuple[int, ...] = (BUYER, BUYER2), amount: int = 10**12) -> Token:
    """Circle's real USDC (FiatTokenV2_2 behind its proxy, initialised through V2_2), buyers funded."""
    from escrow_devtools.fiat_token import deploy_fiat_token as deploy_usdc
    from escrow_devtools.fiat_token import mint_fiat_token

    owner = chain.sender(FIAT_OWNER)
    token = Token(chain.w3, deploy_usdc(chain.sender(FIAT_ADMIN), owner))
    for who in fund:
        mint_fiat_token(owner, token.address, address(who), amount)
    return token
