"""Circle's FiatToken v2.2 (USDC) as shipped: it deploys behind its proxy through every initializer, and the
escrow works with it, including its blacklist (the documented limit: a frozen buyer's refund waits)."""

from __future__ import annotations

import json

from eth_abi.abi import decode
from eth_utils.crypto import keccak
from fixtures.chain import BUYER, OPERATOR, SELLER, STRANGER, Chain
from helpers import FIAT_ADMIN, FIAT_OWNER, address, clock_at, deploy_fiat_token, deposit, expect_revert, make_terms

from escrow_devtools.artifacts import CIRCLE_CONTRACTS, CIRCLE_DIR, load_artifact
from escrow_devtools.fiat_token import blacklist, unblacklist
from escrow_py.protocol.terms import State, delivery_hash

COMMIT = "46e61d0050520f4227cc02ae0d55e8aee3d43fb6"
# EIP-1967-style slot where FiatTokenProxy (zeppelinos' AdminUpgradeabilityProxy) keeps the implementation.
IMPLEMENTATION_SLOT = keccak(text="org.zeppelinos.proxy.implementation")


def _read(chain: Chain, token: str, signature: str, output: str, *args: bytes) -> object:
    data = keccak(text=signature)[:4] + b"".join(args)
    return decode([output], chain.sender(STRANGER).call(token, data))[0]


def test_the_shipped_artifacts_say_where_they_come_from() -> None:
    notice = (CIRCLE_DIR / "NOTICE.md").read_text()
    assert COMMIT in notice and "Apache License, Version 2.0" in notice
    for name in CIRCLE_CONTRACTS:
        artifact = json.loads((CIRCLE_DIR / f"{name}.json").read_text())
        assert artifact["source"] == {
            "repository": "https://github.com/circlefin/stablecoin-evm",
            "commit": COMMIT,
            "license": "Apache-2.0",
        }
        assert artifact["compiler"]["version"].startswith("0.6.12+commit.27d51765")
        assert len(artifact["bytecode"]) > 2
    assert not list(CIRCLE_DIR.glob("*.sol")), "Circle's sources are not part of this repository"


def test_fiat_token_deploys_behind_its_proxy_through_every_initializer(chain: Chain) -> None:
    usdc = deploy_fiat_token(chain)
    slot = bytes(chain.w3.eth.get_storage_at(usdc.address, int.from_bytes(IMPLEMENTATION_SLOT, "big")))
    implementation = chain.w3.to_checksum_address(slot[12:])
    runtime = bytes(chain.w3.eth.get_code(implementation)).hex()
    assert len(runtime) == len(load_artifact("FiatTokenV2_2")["deployedBytecode"]) - 2  # linked, same length
    domain = usdc.domain()
    assert (domain.name, domain.version) == ("USDC", "2")
    assert _read(chain, usdc.address, "symbol()", "string") == "USDC"
    assert _read(chain, usdc.address, "decimals()", "uint8") == 6
    assert str(_read(chain, usdc.address, "owner()", "address")).lower() == address(FIAT_OWNER).lower()
    # initializeV2_1 blacklists the token's own address; initializeV2_2 ran: a second call is refused.
    proxy_word = bytes(12) + bytes.fromhex(usdc.address[2:])
    assert _read(chain, usdc.address, "isBlacklisted(address)", "bool", proxy_word) is True
    data = usdc.contract.w3.eth.contract(abi=load_artifact("FiatTokenV2_2")["abi"]).encode_abi(
        "initializeV2_2", args=[[], "USDC"]
    )
    with expect_revert("UnknownRevert"):  # require(_initializedVersion == 2), without a message
        chain.sender(FIAT_OWNER).call(usdc.address, bytes.fromhex(data[2:]))
    assert usdc.balance_of(address(BUYER)) == 10**12
    # The proxy answers its admin itself (admin calls never reach the token).
    admin = decode(["address"], chain.sender(FIAT_ADMIN).call(usdc.address, keccak(text="admin()")[:4]))[0]
    assert admin.lower() == address(FIAT_ADMIN).lower()


def test_the_escrow_holds_delivers_and_refunds_real_usdc(chain: Chain) -> None:
    usdc = deploy_fiat_token(chain)
    delivered = make_terms(chain, token=usdc.address, amount=10_000)
    refunded = make_terms(chain, token=usdc.address, amount=20_000, window=100)
    deposit(chain, delivered)
    deposit(chain, refunded)
    assert usdc.balance_of(chain.escrow.address) == 30_000
    chain.escrow.deliver(chain.sender(OPERATOR), delivered, delivery_hash(b"ok"))
    clock_at(chain, refunded.deadline)
    chain.escrow.refund_many(chain.sender(STRANGER), [refunded])
    assert usdc.balance_of(address(SELLER)) == 10_000
    assert usdc.balance_of(address(BUYER)) == 10**12 - 10_000
    assert usdc.balance_of(chain.escrow.address) == 0


def test_a_blacklisted_buyers_refund_waits_held_until_the_blacklist_lifts(chain: Chain) -> None:
    """The Known limit in X402Escrow's NatSpec, on Circle's own code: no fallback recipient, funds stay Held."""
    usdc = deploy_fiat_token(chain)
    terms = make_terms(chain, token=usdc.address, amount=5_000, window=100)
    deposit(chain, terms)
    blacklist(chain.sender(FIAT_OWNER), usdc.address, terms.buyer)
    clock_at(chain, terms.deadline)
    with expect_revert("TransferFailed", token=usdc.address, to=terms.buyer, amount=5_000):
        chain.escrow.refund(chain.sender(STRANGER), terms)
    receipt = chain.escrow.refund_many(chain.sender(STRANGER), [terms])  # a keeper's batch: put back, reported
    assert [(f.to, f.amount) for f in chain.escrow.payout_failures_in(receipt)] == [(terms.buyer, 5_000)]
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    assert usdc.balance_of(chain.escrow.address) == 5_000
    unblacklist(chain.sender(FIAT_OWNER), usdc.address, terms.buyer)
    chain.escrow.refund(chain.sender(STRANGER), terms)
    assert usdc.balance_of(terms.buyer) == 10**12
