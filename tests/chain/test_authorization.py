"""ERC-3009 authorizations: wire form, signing, recovery, and acceptance by the real token."""

from __future__ import annotations

import os
from typing import Any

import pytest
from fixtures.chain import BUYER, STRANGER, Chain
from helpers import dev, make_terms

from escrow_py.protocol.eip3009 import (
    RECEIVE_WITH_AUTHORIZATION,
    TRANSFER_WITH_AUTHORIZATION,
    Authorization,
    TokenDomain,
    authorization_for,
    recover_signer,
    sign_authorization,
)

DOMAIN = TokenDomain(name="USDC", version="2", chain_id=84532, verifying_contract=dev(9).address)


def _auth() -> Authorization:
    return Authorization(
        from_=dev(BUYER).address,
        to=dev(STRANGER).address,
        value=10_000,
        valid_after=0,
        valid_before=1_900_000_000,
        nonce=os.urandom(32),
    )


def test_json_round_trip_uses_decimal_strings() -> None:
    auth = _auth()
    wire = auth.to_json()
    assert wire["value"] == "10000" and wire["validAfter"] == "0" and wire["nonce"].startswith("0x")
    assert Authorization.from_json(wire) == auth
    assert Authorization.from_json({**wire, "value": 10_000}) == auth


@pytest.mark.parametrize(
    "change",
    [
        {"value": "-5"},
        {"value": 1.5},
        {"validBefore": True},
        {"validAfter": "0x10"},
        {"nonce": "0x" + "00" * 31},
        {"nonce": "0xnothex"},
        {"from": "0x1234"},
    ],
)
def test_from_json_rejects_malformed_input(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="authorization"):
        Authorization.from_json({**_auth().to_json(), **change})


def test_from_json_names_a_missing_field() -> None:
    wire = _auth().to_json()
    del wire["validBefore"]
    with pytest.raises(ValueError, match="validBefore is missing"):
        Authorization.from_json(wire)
    with pytest.raises(ValueError, match="JSON object"):
        Authorization.from_json(["not", "an", "object"])


def test_sign_and_recover() -> None:
    auth = _auth()
    signature = sign_authorization(dev(BUYER), DOMAIN, auth)
    assert len(signature) == 65
    assert recover_signer(DOMAIN, auth, signature) == auth.from_
    # Any change to the message, the domain or the primary type recovers someone else.
    assert recover_signer(DOMAIN, auth.with_(value=10_001), signature) != auth.from_
    assert recover_signer(DOMAIN.with_(name="USD Coin"), auth, signature) != auth.from_
    assert recover_signer(DOMAIN, auth, signature, TRANSFER_WITH_AUTHORIZATION) != auth.from_


def test_sign_refuses_a_signer_that_is_not_the_payer() -> None:
    with pytest.raises(ValueError, match="not the authorization's payer"):
        sign_authorization(dev(STRANGER), DOMAIN, _auth())


def test_recover_rejects_a_malformed_signature_with_a_value_error() -> None:
    # Callers (the seller's verifier) catch ValueError to answer 402, never 500.
    with pytest.raises(ValueError, match=r"malformed signature \(10 bytes\)"):
        recover_signer(DOMAIN, _auth(), b"\x01" * 10)
    with pytest.raises(ValueError, match="malformed signature"):
        recover_signer(DOMAIN, _auth(), b"\x01" * 66)


def test_authorization_for_deposits_names_the_escrow_id(chain: Chain) -> None:
    terms = make_terms(chain)
    auth = authorization_for(terms, chain.escrow.address, 84532, 0, terms.deadline)
    assert auth.nonce == chain.escrow.onchain_escrow_id(terms)
    assert auth.to == chain.escrow.address and auth.value == terms.amount and auth.from_ == terms.buyer
    # The token's real domain verifies the signature: the token's own digest agrees with ours.
    domain = chain.token.domain()
    assert domain == TokenDomain(name="USDC", version="2", chain_id=84532, verifying_contract=chain.token.address)
    signature = sign_authorization(dev(BUYER), domain, auth, RECEIVE_WITH_AUTHORIZATION)
    assert recover_signer(domain, auth, signature) == terms.buyer
