"""The seller recovers an authorization's signer from the EIP-712 message it builds itself (a cached domain
separator and one ABI encoding of the struct, eip3009.recover_signer), not through eth-account's typed-data
encoder. The two must never differ: a digest that drifts would refuse every honest payment, or accept a
signature over other values.
"""

from __future__ import annotations

import os

import pytest
from eth_account.messages import encode_typed_data
from helpers import dev

from escrow_py.protocol.eip3009 import (
    RECEIVE_WITH_AUTHORIZATION,
    TRANSFER_WITH_AUTHORIZATION,
    Authorization,
    TokenDomain,
    authorization_struct_hash,
    recover_signer,
    typed_data,
)


def authorization(seed: int) -> Authorization:
    return Authorization(
        from_=dev(seed % 5).address,
        to="0x" + os.urandom(20).hex(),
        value=int.from_bytes(os.urandom(12), "big"),
        valid_after=seed,
        valid_before=2**40 + seed,
        nonce=os.urandom(32),
    )


DOMAINS = [
    TokenDomain(name="USDC", version="2", chain_id=84532, verifying_contract="0x" + "ab" * 20),
    TokenDomain(name="Token é", version="10", chain_id=1, verifying_contract="0x" + "01" * 20),
]


@pytest.mark.parametrize("primary", [RECEIVE_WITH_AUTHORIZATION, TRANSFER_WITH_AUTHORIZATION])
@pytest.mark.parametrize("domain", DOMAINS, ids=["usdc", "unicode"])
def test_the_message_is_eth_accounts_typed_data_message(primary: str, domain: TokenDomain) -> None:
    for seed in range(5):
        auth = authorization(seed)
        expected = encode_typed_data(full_message=typed_data(primary, domain, auth))
        assert expected.version == b"\x01"
        assert expected.header == domain.separator()
        assert expected.body == authorization_struct_hash(primary, auth)


def test_the_signer_is_recovered_and_a_changed_value_names_someone_else() -> None:
    domain, auth = DOMAINS[0], authorization(1)
    signer = dev(1)
    signature = signer.sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, domain, auth))
    assert recover_signer(domain, auth, signature) == signer.address
    # The signature binds every field, the primary type and the domain.
    assert recover_signer(domain, auth.model_copy(update={"value": auth.value + 1}), signature) != signer.address
    assert recover_signer(DOMAINS[1], auth, signature) != signer.address
    assert recover_signer(domain, auth, signature, TRANSFER_WITH_AUTHORIZATION) != signer.address
    with pytest.raises(ValueError, match="malformed signature"):
        recover_signer(domain, auth, signature[:40])
