"""Receipt gas of every escrow operation, against a plain x402 `exact` payment, in one run.

Everything is measured on one fresh anvil with the shipped TestUSDC, in the
steady state a production deployment lives in: the exact payment's seller and
the escrow already hold a balance of the token, so neither pays for creating a
balance slot. Batch figures are a whole 50-entry batch's gas divided by 50
(one seller for deliverMany, one buyer for refundMany: a seller posts its own
deliveries, and a keeper sorts its refunds by buyer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from escrow_py.chain.anvil import Anvil, dev_signer
from escrow_py.chain.authorization import (
    TRANSFER_WITH_AUTHORIZATION,
    Authorization,
    authorization_for,
    sign_authorization,
)
from escrow_py.chain.escrow import Escrow, deploy
from escrow_py.chain.signer import LocalSigner
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.terms import Terms, request_hash

BATCH = 50
AMOUNT = 10_000  # 0.01 USDC
TARGETS = {
    "deposit": 1.40,
    "deliver": 0.70,
    "refund": 0.70,
    "deliver_many_per_item": 0.20,
    "refund_many_per_item": 0.20,
}


@dataclass
class _Bench:
    escrow: Escrow
    token: Token
    buyer: LocalSigner
    seller: TxSender
    submitter: TxSender
    deadline: int

    def terms(self) -> tuple[Terms, Authorization, bytes]:
        terms = Terms(
            buyer=self.buyer.address,
            seller=self.seller.address,
            operator=self.seller.address,
            token=self.token.address,
            amount=AMOUNT,
            deadline=self.deadline,
            request_hash=request_hash("GET", "http://127.0.0.1/report"),
            salt=Terms.new_salt(),
        )
        auth = authorization_for(terms, self.escrow.address, self.escrow.chain_id, 0, self.deadline)
        return terms, auth, sign_authorization(self.buyer, self.token.domain(), auth)

    def deposited(self) -> tuple[Terms, int]:
        terms, auth, signature = self.terms()
        receipt = self.escrow.deposit(self.submitter, terms, auth, signature)
        return terms, int(receipt["gasUsed"])


def measure_gas(progress: Any = None) -> dict[str, Any]:
    """Deploy on a fresh anvil and measure; returns the JSON-ready result."""
    say = progress or (lambda _msg: None)
    with Anvil() as node:
        w3 = node.web3()
        submitter = TxSender(w3, dev_signer(0))
        buyer, seller = dev_signer(1), TxSender(w3, dev_signer(2))
        say("deploying TestUSDC and X402Escrow")
        token = Token(w3, deploy(submitter, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(submitter, "X402Escrow"))
        token.mint(submitter, buyer.address, 10**15)
        # Steady state: the payees already hold the token.
        token.mint(submitter, seller.address, 1)
        token.mint(submitter, escrow.address, 1)
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 3600
        bench = _Bench(escrow, token, buyer, seller, submitter, deadline)

        say("x402 exact: transferWithAuthorization buyer -> seller")
        exact_auth = Authorization(buyer.address, seller.address, AMOUNT, 0, deadline, os.urandom(32))
        exact_sig = sign_authorization(buyer, token.domain(), exact_auth, TRANSFER_WITH_AUTHORIZATION)
        exact = int(
            submitter.transact(token.address, token.transfer_with_authorization_data(exact_auth, exact_sig))["gasUsed"]
        )

        say("deposit, deliver, refund")
        terms, deposit = bench.deposited()
        deliver = int(escrow.deliver(seller, terms, b"\x01" * 32)["gasUsed"])
        terms, _ = bench.deposited()
        refund = int(escrow.refund(seller, terms)["gasUsed"])

        say(f"deliverMany and refundMany of {BATCH}")
        batch = [bench.deposited()[0] for _ in range(BATCH)]
        deliver_many = int(escrow.deliver_many(seller, [(t, b"\x02" * 32) for t in batch])["gasUsed"])
        batch = [bench.deposited()[0] for _ in range(BATCH)]
        refund_many = int(escrow.refund_many(seller, batch)["gasUsed"])

    result: dict[str, Any] = {
        "exact": exact,
        "deposit": deposit,
        "deliver": deliver,
        "refund": refund,
        "deliver_many_per_item": deliver_many // BATCH,
        "refund_many_per_item": refund_many // BATCH,
    }
    result["ratios"] = {k: round(v / exact, 3) for k, v in result.items() if k != "exact"}
    result["batch_size"] = BATCH
    result["targets"] = TARGETS
    return result
