"""ERC-3009 authorizations: the buyer's signature that lets the escrow pull the payment.

The buyer signs a `ReceiveWithAuthorization` with `to` = the escrow, `value` =
the amount and `nonce` = the escrow id, in the token's EIP-712 domain
(USDC on Base Sepolia: name "USDC", version "2").
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Protocol

from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import SignableMessage
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from pydantic import Field

from escrow_py.protocol.codec import Address, Bytes32, CamelModel, Uint256
from escrow_py.protocol.terms import Terms


class TypedDataSigner(Protocol):
    """What signing an authorization asks of a key; `escrow_py.chain.signer.Signer` extends it."""

    @property
    def address(self) -> ChecksumAddress: ...

    def sign_typed_data(self, typed_data: dict[str, Any]) -> bytes:
        """A 65-byte (r, s, v) signature over an EIP-712 message (full `types/domain/message` form)."""
        ...


EIP712_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)

RECEIVE_WITH_AUTHORIZATION = "ReceiveWithAuthorization"
TRANSFER_WITH_AUTHORIZATION = "TransferWithAuthorization"

_AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


class TokenDomain(CamelModel):
    """The token's EIP-712 domain."""

    name: str
    version: str
    chain_id: Uint256
    verifying_contract: Address

    def as_dict(self) -> dict[str, Any]:
        """The `domain` of an EIP-712 message, for eth-account."""
        return self.model_dump(by_alias=True)

    def separator(self) -> bytes:
        """The EIP-712 domain separator, as the token's DOMAIN_SEPARATOR() returns it for this domain."""
        return _separator(self)


@functools.lru_cache(maxsize=64)  # a seller has one token domain per network: worked out once, not per payment
def _separator(domain: TokenDomain) -> bytes:
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                EIP712_DOMAIN_TYPEHASH,
                keccak(text=domain.name),
                keccak(text=domain.version),
                domain.chain_id,
                domain.verifying_contract,
            ],
        )
    )


class Authorization(CamelModel):
    """An ERC-3009 authorization message (the x402 payload's `authorization`).

    Its wire form writes every number as a decimal string, as x402's exact scheme does.
    """

    WHERE: ClassVar[str] = "authorization"

    from_: Address = Field(alias="from")
    to: Address
    value: Uint256
    valid_after: Uint256
    valid_before: Uint256
    nonce: Bytes32

    def as_tuple(self) -> tuple[Any, ...]:
        """The ABI values, in the order of the ERC-3009 functions' arguments and of the signed struct."""
        return (self.from_, self.to, self.value, self.valid_after, self.valid_before, self.nonce)

    def as_message(self) -> dict[str, Any]:
        """The `message` of the EIP-712 typed data: numbers as ints, the nonce as bytes."""
        return self.model_dump(by_alias=True)


_EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def _message(
    primary_type: str, fields: list[dict[str, str]], domain: TokenDomain, message: dict[str, Any]
) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": _EIP712_DOMAIN_FIELDS, primary_type: fields},
        "primaryType": primary_type,
        "domain": domain.as_dict(),
        "message": message,
    }


def typed_data(primary_type: str, domain: TokenDomain, authorization: Authorization) -> dict[str, Any]:
    """The full EIP-712 message of a Transfer- or ReceiveWithAuthorization, for eth-account."""
    return _message(primary_type, _AUTHORIZATION_FIELDS, domain, authorization.as_message())


def cancel_typed_data(domain: TokenDomain, authorizer: str, nonce: bytes) -> dict[str, Any]:
    """The ERC-3009 CancelAuthorization message: lets a buyer withdraw a payment never deposited."""
    fields = [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]
    return _message(
        "CancelAuthorization", fields, domain, {"authorizer": to_checksum_address(authorizer), "nonce": nonce}
    )


def authorization_for(terms: Terms, escrow: str, chain_id: int, valid_after: int, valid_before: int) -> Authorization:
    """The ReceiveWithAuthorization that deposits `terms` into `escrow`."""
    return Authorization(
        from_=terms.buyer,
        to=escrow,
        value=terms.amount,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=terms.escrow_id(chain_id, escrow),
    )


def sign_authorization(
    signer: TypedDataSigner,
    domain: TokenDomain,
    authorization: Authorization,
    primary_type: str = RECEIVE_WITH_AUTHORIZATION,
) -> bytes:
    if signer.address != authorization.from_:
        raise ValueError(f"signer {signer.address} is not the authorization's payer {authorization.from_}")
    return signer.sign_typed_data(typed_data(primary_type, domain, authorization))


@functools.lru_cache(maxsize=8)
def _type_hash(primary_type: str) -> bytes:
    fields = ",".join(f"{f['type']} {f['name']}" for f in _AUTHORIZATION_FIELDS)
    return keccak(text=f"{primary_type}({fields})")


def authorization_struct_hash(primary_type: str, authorization: Authorization) -> bytes:
    """hashStruct of a Transfer- or ReceiveWithAuthorization message (EIP-712), the fields of _AUTHORIZATION_FIELDS."""
    return keccak(
        encode(
            ["bytes32", *(f["type"] for f in _AUTHORIZATION_FIELDS)],
            [_type_hash(primary_type), *authorization.as_tuple()],
        )
    )


def recover_signer(
    domain: TokenDomain, authorization: Authorization, signature: bytes, primary_type: str = RECEIVE_WITH_AUTHORIZATION
) -> ChecksumAddress:
    """The address that signed; raises ValueError for a malformed signature."""
    # The EIP-712 message eth-account's encode_typed_data builds from typed_data(), built here from the cached
    # domain separator and the struct's one ABI encoding: that function re-parses the types and hashes the
    # domain again for every payment (tests/unit/test_eip3009_digest.py holds the two equal).
    message = SignableMessage(b"\x01", domain.separator(), authorization_struct_hash(primary_type, authorization))
    try:
        return to_checksum_address(Account.recover_message(message, signature=signature))
    except Exception as exc:  # noqa: BLE001 - eth-account raises several unrelated types for bad signatures
        raise ValueError(f"malformed signature ({len(signature)} bytes): {type(exc).__name__}") from None
