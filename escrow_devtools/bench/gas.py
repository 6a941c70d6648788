"""Receipt gas of every escrow operation, against a plain x402 `exact` payment, in one run.

Everything is measured on one fresh anvil, twice: on the shipped USDC-like TestUSDC, and on
Circle's own FiatToken v2.2 behind its proxy (the code of USDC on Base; its calls cost more,
so its `exact` payment does too). Each ratio is against the `exact` payment on the same token.
The state is the steady state a production deployment lives in: the payees (sellers, buyers
being refunded) and the escrow already hold a balance of the token, so no figure pays for
creating a balance slot.

Batch figures are a whole 50-entry batch's gas divided by 50:
- `deliver_many_per_item`: one seller posting its own deliveries (one transfer for the batch);
- `deliver_many_per_item_distinct_sellers`: an operator serving 50 sellers (50 transfers);
- `refund_many_per_item_one_buyer`: 50 escrows of one buyer (one transfer);
- `refund_many_per_item_distinct_buyers`: what a keeper meets, 50 buyers (50 transfers);
- `settle_many_per_item`: serve-first, 50 buyers paying one seller.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from eth_abi.abi import encode
from eth_account import Account
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from web3 import Web3

from escrow_devtools.anvil import DEV_MNEMONIC, Anvil, dev_signer
from escrow_devtools.artifacts import deploy
from escrow_devtools.fiat_token import deploy_fiat_token
from escrow_py.chain.escrow import Escrow, Settlement
from escrow_py.chain.signer import LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.eip3009 import (
    TRANSFER_WITH_AUTHORIZATION,
    Authorization,
    TokenDomain,
    authorization_for,
    sign_authorization,
)
from escrow_py.protocol.terms import Terms, delivery_hash, request_hash

BATCH = 50
AMOUNT = 10_000  # 0.01 USDC
TOKENS = ("TestUSDC", "FiatToken")
OPERATIONS = (
    "deposit",
    "deliver",
    "refund",
    "settle",
    "deliver_many_per_item",
    "deliver_many_per_item_distinct_sellers",
    "refund_many_per_item_one_buyer",
    "refund_many_per_item_distinct_buyers",
    "settle_many_per_item",
)
# Upper bounds on the ratio to `exact` on the same token (issues 12 and 14).
TARGETS: dict[str, dict[str, float]] = {
    "TestUSDC": {
        "deposit": 1.45,
        "deliver": 0.70,
        "refund": 0.70,
        "settle": 1.30,
        "deliver_many_per_item": 0.20,
        "refund_many_per_item_one_buyer": 0.20,
        "settle_many_per_item": 0.75,
    },
    "FiatToken": {
        "deposit": 1.38,
        "deliver": 0.68,
        "refund": 0.68,
        "settle": 1.30,
        "refund_many_per_item_distinct_buyers": 0.27,
        "settle_many_per_item": 0.75,
    },
}
_DEPOSIT_GAS = 400_000  # a fixed limit: batches of deposits go out without an estimate each
_MINT_GAS = 200_000


@cache
def _buyer(index: int) -> LocalSigner:
    """Buyer `index`: the account at that index of anvil's public development mnemonic (no real value)."""
    if index < 10:
        return dev_signer(index)
    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return LocalSigner.from_key("0x" + bytes(account.key).hex())


def _payee(index: int) -> ChecksumAddress:
    """A distinct seller address (it only receives, so it needs no key)."""
    return Web3.to_checksum_address(f"0x{0x5E11E70000 + index:040x}")


@dataclass
class _Bench:
    escrow: Escrow
    token: Token
    operator: TxSender
    submitter: TxSender
    deadline: int
    # Read once: every one of the ~250 signatures per token signs against it, and each read is three RPC calls.
    domain: TokenDomain

    def signed(self, buyer: LocalSigner, seller: str) -> Settlement:
        """Terms between `buyer` and `seller` (operator: the operator key), and the buyer's signature."""
        terms = Terms(
            buyer=buyer.address,
            seller=Web3.to_checksum_address(seller),
            operator=self.operator.address,
            token=self.token.address,
            amount=AMOUNT,
            deadline=self.deadline,
            request_hash=request_hash("GET", "http://127.0.0.1/report"),
            salt=Terms.new_salt(),
        )
        auth = authorization_for(terms, self.escrow.address, self.escrow.chain_id, 0, self.deadline)
        signature = sign_authorization(buyer, self.domain, auth)
        return Settlement(terms, auth, signature, delivery_hash(terms.salt))

    def deposited(self, entries: Sequence[Settlement]) -> list[int]:
        """Deposit every entry (each its own transaction); returns each one's gas."""
        calls = [(self.escrow.address, self.escrow.deposit_data(e.terms, e.authorization, e.signature), _DEPOSIT_GAS)
                 for e in entries]  # fmt: skip
        return _send_all(self.submitter, calls)


def _send_all(sender: TxSender, calls: Sequence[tuple[str, bytes, int]]) -> list[int]:
    """Send each (to, data, gas) as its own transaction, one after another; each one's receipt gas, each checked
    to have succeeded (TxSender.transact raises TransactionFailed on a revert).

    Set-up traffic (the funding mints, the deposits the batch figures need). Not signed ahead with
    consecutive nonces and sent without waiting: in two full-suite runs one of them was never mined ("nonce -1
    not confirmed within 120s"), which the one-at-a-time path has never shown.
    """
    return [int(sender.transact(to, data, gas=gas)["gasUsed"]) for to, data, gas in calls]


def _exact(bench: _Bench, buyer: LocalSigner, seller: str) -> int:
    """x402 `exact`: the buyer's transferWithAuthorization straight to the seller."""
    auth = Authorization(
        from_=buyer.address, to=seller, value=AMOUNT, valid_after=0, valid_before=bench.deadline, nonce=os.urandom(32)
    )
    signature = sign_authorization(buyer, bench.domain, auth, TRANSFER_WITH_AUTHORIZATION)
    data = bench.token.transfer_with_authorization_data(auth, signature)
    return int(bench.submitter.transact(bench.token.address, data)["gasUsed"])


def _fund(minter: TxSender, token: str, amounts: Sequence[tuple[str, int]]) -> None:
    """Mint each (address, amount) on TestUSDC or FiatToken (both `mint(address,uint256)`, `minter` allowed)."""
    selector = keccak(text="mint(address,uint256)")[:4]
    _send_all(
        minter, [(token, selector + encode(["address", "uint256"], [to, amount]), _MINT_GAS) for to, amount in amounts]
    )


def _measure_token(
    w3: Web3, escrow: Escrow, token: Token, minter: TxSender, say: Callable[[str], None]
) -> dict[str, Any]:
    operator, submitter = TxSender(w3, dev_signer(2)), TxSender(w3, dev_signer(0))
    seller = operator.address  # a seller that posts its own deliveries is its own operator
    buyers = [_buyer(10 + i) for i in range(BATCH)]
    sellers = [_payee(i) for i in range(BATCH)]
    say(f"{token.address}: funding {len(buyers)} buyers; every payee and the escrow hold a balance already")
    _fund(
        minter,
        token.address,
        [(b.address, 10**12) for b in buyers] + [(p, 1) for p in [seller, escrow.address, *sellers]],
    )
    deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600
    bench = _Bench(escrow, token, operator, submitter, deadline, token.domain())
    one = buyers[0]
    gas: dict[str, int] = {"exact": _exact(bench, one, seller)}

    say("deposit, deliver, refund, settle")
    entry = bench.signed(one, seller)
    gas["deposit"] = bench.deposited([entry])[0]
    gas["deliver"] = int(escrow.deliver(operator, entry.terms, entry.delivery_hash)["gasUsed"])
    entry = bench.signed(one, seller)
    bench.deposited([entry])
    gas["refund"] = int(escrow.refund(operator, entry.terms)["gasUsed"])
    gas["settle"] = int(escrow.settle(operator, bench.signed(one, seller))["gasUsed"])

    say(f"batches of {BATCH}: deliverMany, refundMany, settleMany")
    batch = [bench.signed(buyer, seller) for buyer in buyers]
    bench.deposited(batch)
    whole = escrow.deliver_many(operator, [(e.terms, e.delivery_hash) for e in batch])["gasUsed"]
    gas["deliver_many_per_item"] = int(whole) // BATCH
    batch = [bench.signed(buyer, payee) for buyer, payee in zip(buyers, sellers, strict=True)]
    bench.deposited(batch)
    whole = escrow.deliver_many(operator, [(e.terms, e.delivery_hash) for e in batch])["gasUsed"]
    gas["deliver_many_per_item_distinct_sellers"] = int(whole) // BATCH
    batch = [bench.signed(one, seller) for _ in buyers]
    bench.deposited(batch)
    whole = escrow.refund_many(operator, [e.terms for e in batch])["gasUsed"]
    gas["refund_many_per_item_one_buyer"] = int(whole) // BATCH
    batch = [bench.signed(buyer, seller) for buyer in buyers]
    bench.deposited(batch)
    whole = escrow.refund_many(operator, [e.terms for e in batch])["gasUsed"]
    gas["refund_many_per_item_distinct_buyers"] = int(whole) // BATCH
    batch = [bench.signed(buyer, seller) for buyer in buyers]
    gas["settle_many_per_item"] = int(escrow.settle_many(operator, batch)["gasUsed"]) // BATCH
    return gas


def measure_gas(progress: Any = None, tokens: Sequence[str] = TOKENS) -> dict[str, Any]:
    """Deploy on a fresh anvil and measure on each of `tokens`; returns the JSON-ready result.

    `result[token][operation]` is receipt gas, `result[token]["ratios"][operation]` the ratio to
    `result[token]["exact"]`, `result[token]["targets"]` the bounds and `["met"]` whether each holds.
    """
    say = progress or (lambda _msg: None)
    result: dict[str, Any] = {"batch_size": BATCH}
    with Anvil(extra_args=["--gas-limit", "60000000"]) as node:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        say("deploying X402Escrow through the CREATE2 proxy")
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        for name in tokens:
            if name == "TestUSDC":
                say("deploying TestUSDC")
                token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
                minter = deployer  # anyone may mint TestUSDC
            elif name == "FiatToken":
                say("deploying Circle's FiatToken v2.2 behind its proxy")
                minter = TxSender(w3, dev_signer(9))  # deploy_fiat_token makes it the minter
                token = Token(w3, deploy_fiat_token(TxSender(w3, dev_signer(8)), minter))
            else:
                raise ValueError(f"unknown token {name!r}: choose among {', '.join(TOKENS)}")
            gas = _measure_token(w3, escrow, token, minter, say)
            exact = gas["exact"]
            targets = TARGETS[name]
            ratios = {op: round(gas[op] / exact, 3) for op in OPERATIONS}
            result[name] = {
                **gas,
                "ratios": ratios,
                "targets": targets,
                "met": {op: ratios[op] <= bound for op, bound in targets.items()},
            }
    result["tokens"] = list(tokens)
    return result
