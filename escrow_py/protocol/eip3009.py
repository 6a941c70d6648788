"""ERC-3009 authorizations: the buyer's signature that lets the escrow pull the payment.

The buyer signs a `ReceiveWithAuthorization` with `to` = the escrow, `value` =
the amount and `nonce` = the escrow id, in the token's EIP-712 domain
(USDC on Base Sepolia: name "USDC", version "2").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow_py.protocol.terms import Terms, parse_uint


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


@dataclass(frozen=True, slots=True)
class TokenDomain:
    """The token's EIP-712 domain."""

    name: str
    version: str
    chain_id: int
    verifying_contract: ChecksumAddress

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }

    def separator(self) -> bytes:
        """The EIP-712 domain separator, as the token's DOMAIN_SEPARATOR() returns it for this domain."""
        return keccak(
            encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    EIP712_DOMAIN_TYPEHASH,
                    keccak(text=self.name),
                    keccak(text=self.version),
                    self.chain_id,
                    self.verifying_contract,
                ],
            )
        )


@dataclass(frozen=True, slots=True)
class Authorization:
    """An ERC-3009 authorization message (the x402 payload's `authorization`)."""

    from_: ChecksumAddress
    to: ChecksumAddress
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def as_message(self) -> dict[str, Any]:
        return {
            "from": self.from_,
            "to": self.to,
            "value": self.value,
            "validAfter": self.valid_after,
            "validBefore": self.valid_before,
            "nonce": self.nonce,
        }

    def to_json(self) -> dict[str, str]:
        """Wire form: every number a decimal string, as in x402's exact scheme."""
        return {
            "from": self.from_,
            "to": self.to,
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": "0x" + self.nonce.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Authorization:
        if not isinstance(data, dict):
            raise ValueError("authorization must be a JSON object")
        try:
            if not isinstance(data["nonce"], str):
                raise ValueError("authorization.nonce must be a 0x hex string")
            nonce = bytes.fromhex(data["nonce"].removeprefix("0x"))
            # uint256 on the token: anything wider is refused here, not by the ABI encoder later.
            numbers = {
                key: parse_uint(data[key], f"authorization.{key}") for key in ("value", "validAfter", "validBefore")
            }
            for key in ("from", "to"):
                if not isinstance(data[key], str):
                    raise ValueError(f"authorization.{key} must be an address string")
            auth = cls(
                from_=to_checksum_address(data["from"]),
                to=to_checksum_address(data["to"]),
                value=numbers["value"],
                valid_after=numbers["validAfter"],
                valid_before=numbers["validBefore"],
                nonce=nonce,
            )
        except KeyError as exc:
            raise ValueError(f"authorization.{exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid authorization: {exc}") from None
        if len(auth.nonce) != 32:
            raise ValueError("authorization.nonce must be 32 bytes")
        return auth


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
        to=to_checksum_address(escrow),
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


def recover_signer(
    domain: TokenDomain, authorization: Authorization, signature: bytes, primary_type: str = RECEIVE_WITH_AUTHORIZATION
) -> ChecksumAddress:
    """The address that signed; raises ValueError for a malformed signature."""
    message = encode_typed_data(full_message=typed_data(primary_type, domain, authorization))
    try:
        return to_checksum_address(Account.recover_message(message, signature=signature))
    except Exception as exc:  # noqa: BLE001 - eth-account raises several unrelated types for bad signatures
        raise ValueError(f"malformed signature ({len(signature)} bytes): {type(exc).__name__}") from None
