"""`x402-escrow demo`: the escrow's promise, played on a fresh local chain.

Contract-level stories (the HTTP stories with the seller middleware, the buyer
client and the keeper replace these as those parts land):

1. paid and delivered: the seller posts keccak256(body); the buyer checks it on chain;
2. the handler fails: the operator refunds at once;
3. the buyer is gone and the seller never delivers: after the deadline a third
   party (any keeper) refunds the buyer, who signs nothing more.

It ends with every token accounted for and exits non-zero otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from escrow_py.chain.anvil import Anvil, dev_signer
from escrow_py.chain.authorization import authorization_for, sign_authorization
from escrow_py.chain.escrow import Delivered, Escrow, deploy
from escrow_py.chain.token import Token
from escrow_py.chain.tx import TxSender
from escrow_py.terms import State, Terms, delivery_hash, request_hash

PRICE = 10_000  # 0.01 USDC
FUNDING = 5 * 10**6  # 5 USDC


def _usdc(amount: int) -> str:
    return f"{amount / 10**6:,.6f}"


def run_demo(say: Callable[[str], None] = print) -> bool:
    """Play the stories; True if every token is accounted for."""
    with Anvil() as node:
        w3 = node.web3()
        deployer = TxSender(w3, dev_signer(0))
        buyer = dev_signer(1)
        seller = TxSender(w3, dev_signer(2))
        keeper = TxSender(w3, dev_signer(3))
        say(f"anvil on {node.url}, chain id {node.chain_id}")
        token = Token(w3, deploy(deployer, "TestUSDC", "USDC", "2"))
        escrow = Escrow(w3, deploy(deployer, "X402Escrow"))
        token.mint(deployer, buyer.address, FUNDING)
        say(f"TestUSDC {token.address}, X402Escrow {escrow.address}, buyer funded with {_usdc(FUNDING)} USDC")
        parties = {"buyer": buyer.address, "seller": seller.address, "escrow": escrow.address}
        before = {name: token.balance_of(addr) for name, addr in parties.items()}
        domain = token.domain()

        def pay(path: str, ttl: int) -> Terms:
            now = int(w3.eth.get_block("latest")["timestamp"])
            terms = Terms(
                buyer=buyer.address,
                seller=seller.address,
                operator=seller.address,
                token=token.address,
                amount=PRICE,
                deadline=now + ttl,
                request_hash=request_hash("GET", f"http://127.0.0.1/{path}"),
                salt=Terms.new_salt(),
            )
            auth = authorization_for(terms, escrow.address, node.chain_id, 0, terms.deadline)
            receipt = escrow.deposit(seller, terms, auth, sign_authorization(buyer, domain, auth))
            state = escrow.state_of(escrow.id_of(terms)).name
            say(f"  deposited {_usdc(PRICE)} USDC in block {receipt['blockNumber']}: state {state}")
            return terms

        say("story 1: paid and delivered")
        terms = pay("report", 120)
        body = b'{"report": "the weather is fine"}'
        receipt = escrow.deliver(seller, terms, delivery_hash(body))
        posted = next(e for e in escrow.events_in(receipt) if isinstance(e, Delivered)).delivery_hash
        verified = posted == delivery_hash(body)
        say(f"  seller served {len(body)} bytes and posted their hash; buyer verifies against the chain: {verified}")

        say("story 2: the handler fails, instant refund")
        terms = pay("broken", 120)
        escrow.refund(seller, terms)
        say(f"  operator refunded at once: state {escrow.state_of(escrow.id_of(terms)).name}")

        say("story 3: buyer gone, seller silent; a keeper refunds after the deadline")
        terms = pay("slow", 30)
        w3.provider.make_request("evm_setNextBlockTimestamp", [terms.deadline])  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        escrow.refund_many(keeper, [terms])
        refunded = escrow.state_of(escrow.id_of(terms)) is State.REFUNDED
        say(f"  deadline passed; a stranger's refundMany returned the funds to the buyer: {refunded}")

        after = {name: token.balance_of(addr) for name, addr in parties.items()}
        say("")
        say(f"{'party':<8}{'before':>14}{'after':>14}")
        for name in parties:
            say(f"{name:<8}{_usdc(before[name]):>14}{_usdc(after[name]):>14}")
        conserved = sum(before.values()) == sum(after.values())
        escrow_holds_held = after["escrow"] == 0  # nothing is left Held at the end
        paid_once = after["seller"] - before["seller"] == PRICE
        ok = verified and refunded and conserved and escrow_holds_held and paid_once
        say(f"sum of balances unchanged: {conserved}; escrow holds exactly what is Held: {escrow_holds_held}")
        say("every token accounted for" if ok else "ACCOUNTING FAILED")
        return ok


def main() -> int:
    return 0 if run_demo() else 1


if __name__ == "__main__":
    sys.exit(main())
