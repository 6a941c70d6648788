"""A smart-wallet buyer (EIP-1271) pays through the `bytes signature` path, on TestUSDC and on Circle's USDC.

The escrow sends a 65-byte signature in the (v, r, s) form. FiatToken v2.2 checks EIP-1271 in
both forms; TestUSDC, like FiatToken before v2.2, checks the (v, r, s) form by ecrecover only, so
for a contract buyer whose pull failed the escrow retries with the bytes form, and a wallet whose
signature happens to be 65 bytes pays too. Other lengths go straight to the bytes form.
"""

from __future__ import annotations

import pytest
from fixtures.chain import OPERATOR, SELLER, Chain
from helpers import FIAT_OWNER, deploy_fiat_token, dev, make_terms

from escrow_devtools.artifacts import deploy
from escrow_devtools.fiat_token import mint_fiat_token
from escrow_py.chain.escrow import Settlement
from escrow_py.chain.token import Token
from escrow_py.protocol.eip3009 import RECEIVE_WITH_AUTHORIZATION, Authorization, authorization_for, typed_data
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.terms import State, Terms, delivery_hash

WALLET_OWNER = 7


def _token(chain: Chain, kind: str) -> Token:
    return chain.token if kind == "TestUSDC" else deploy_fiat_token(chain, fund=())


def _wallet_terms(chain: Chain, token: Token, amount: int = 5_000) -> Terms:
    wallet = deploy(chain.deployer, "SmartWallet", dev(WALLET_OWNER).address)
    if token.address == chain.token.address:
        token.mint(chain.deployer, wallet, amount)
    else:
        mint_fiat_token(chain.sender(FIAT_OWNER), token.address, wallet, amount)
    return make_terms(chain, token=token.address, amount=amount).with_(buyer=wallet)


def _wallet_signature(chain: Chain, token: Token, terms: Terms, length: int) -> tuple[Authorization, bytes]:
    """The wallet owner's signature of the wallet's authorization, framed as `length` bytes (65 or 66)."""
    auth = authorization_for(terms, chain.escrow.address, chain.escrow.chain_id, 0, terms.deadline)
    owner_signature = dev(WALLET_OWNER).sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, token.domain(), auth))
    return auth, owner_signature if length == 65 else b"\x01" + owner_signature


@pytest.mark.parametrize("length", [65, 66])
@pytest.mark.parametrize("kind", ["TestUSDC", "FiatToken"])
def test_a_smart_wallet_deposits_and_is_paid_out(chain: Chain, kind: str, length: int) -> None:
    token = _token(chain, kind)
    terms = _wallet_terms(chain, token)
    auth, signature = _wallet_signature(chain, token, terms, length)
    chain.escrow.deposit(chain.sender(SELLER), terms, auth, signature)
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.HELD
    assert token.balance_of(terms.buyer) == 0
    chain.escrow.refund(chain.sender(OPERATOR), terms)
    assert token.balance_of(terms.buyer) == terms.amount  # refunds reach the wallet


@pytest.mark.parametrize("length", [65, 66])
@pytest.mark.parametrize("kind", ["TestUSDC", "FiatToken"])
def test_a_smart_wallet_pays_serve_first(chain: Chain, kind: str, length: int) -> None:
    token = _token(chain, kind)
    terms = _wallet_terms(chain, token)
    auth, signature = _wallet_signature(chain, token, terms, length)
    entry = Settlement(terms, auth, signature, delivery_hash(b"served"))
    result = chain.escrow.simulate_settle_many(chain.sender(OPERATOR), [entry])
    assert (result.settled, result.skipped) == (1, [])
    chain.escrow.settle_many(chain.sender(OPERATOR), [entry])
    assert token.balance_of(terms.seller) == terms.amount
    assert token.balance_of(terms.buyer) == 0


def test_a_signature_the_wallet_refuses_is_refused(chain: Chain) -> None:
    token = chain.token
    terms = _wallet_terms(chain, token)
    auth, signature = _wallet_signature(chain, token, terms, 66)
    forged = signature[:-1] + bytes([signature[-1] ^ 1])  # v flipped: recovers someone else
    with pytest.raises(ContractRevert) as caught:
        chain.escrow.deposit(chain.sender(SELLER), terms, auth, forged)
    assert caught.value.name == "InvalidSignature"
    assert chain.escrow.state_of(chain.escrow.id_of(terms)) is State.NONE
