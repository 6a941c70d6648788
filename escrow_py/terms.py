"""Terms of an escrowed payment, and the ids and hashes derived from them.

Shared by every role. The derivations mirror `contracts/X402Escrow.sol`
exactly (a test checks each against the contract's own computation):

    termsHash = keccak256(abi.encode(TERMS_TYPEHASH, buyer, seller, operator, token,
                                     amount, deadline, requestHash, salt))
    id        = keccak256(abi.encode(chainId, escrow, termsHash))

The id is also the ERC-3009 nonce the buyer signs, so an escrow id names its terms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from eth_abi.abi import encode
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

TERMS_TYPE = (
    "Terms(address buyer,address seller,address operator,address token,"
    "uint256 amount,uint64 deadline,bytes32 requestHash,bytes32 salt)"
)
TERMS_TYPEHASH = keccak(text=TERMS_TYPE)

# requestHash follows EIP-712's rule for dynamic fields (each is hashed first),
# so an independent client can compute it from this one line.
REQUEST_TYPE = "Request(string method,string url,bytes body)"
REQUEST_TYPEHASH = keccak(text=REQUEST_TYPE)

# The contract refuses deadlines further ahead than this (X402Escrow.MAX_DEADLINE_WINDOW).
MAX_DEADLINE_WINDOW = 30 * 24 * 3600

UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1


class State(IntEnum):
    """An escrow's on-chain state (X402Escrow.State)."""

    NONE = 0
    HELD = 1
    RELEASED = 2
    REFUNDED = 3

    @property
    def settled(self) -> bool:
        return self in (State.RELEASED, State.REFUNDED)


def _bytes32(value: bytes | str, field: str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"{field} must be 32 bytes, got {len(raw)}")
    return raw


def _uint(value: int | str, field: str, maximum: int) -> int:
    number = int(value)
    if isinstance(value, bool) or not 0 <= number <= maximum:
        raise ValueError(f"{field} must be an integer in [0, {maximum}], got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Terms:
    """What the buyer agreed to pay, to whom, and until when (X402Escrow.Terms).

    Addresses are normalised to checksum form and the byte fields to 32 bytes,
    so two Terms that hash alike compare equal.
    """

    buyer: ChecksumAddress
    seller: ChecksumAddress
    operator: ChecksumAddress
    token: ChecksumAddress
    amount: int
    deadline: int
    request_hash: bytes
    salt: bytes

    def __post_init__(self) -> None:
        for name in ("buyer", "seller", "operator", "token"):
            object.__setattr__(self, name, to_checksum_address(getattr(self, name)))
        object.__setattr__(self, "amount", _uint(self.amount, "amount", UINT256_MAX))
        object.__setattr__(self, "deadline", _uint(self.deadline, "deadline", UINT64_MAX))
        object.__setattr__(self, "request_hash", _bytes32(self.request_hash, "requestHash"))
        object.__setattr__(self, "salt", _bytes32(self.salt, "salt"))

    @staticmethod
    def new_salt() -> bytes:
        return os.urandom(32)

    def as_tuple(self) -> tuple[Any, ...]:
        """The ABI tuple, field order as in the contract."""
        return (
            self.buyer,
            self.seller,
            self.operator,
            self.token,
            self.amount,
            self.deadline,
            self.request_hash,
            self.salt,
        )

    def hash(self) -> bytes:
        """termsHash, as X402Escrow.termsHash."""
        return keccak(
            encode(
                ["bytes32", "address", "address", "address", "address", "uint256", "uint64", "bytes32", "bytes32"],
                [TERMS_TYPEHASH, *self.as_tuple()],
            )
        )

    def escrow_id(self, chain_id: int, escrow: str) -> bytes:
        """The escrow id on `chain_id` at `escrow`; also the ERC-3009 nonce."""
        return escrow_id(chain_id, escrow, self.hash())

    def to_json(self) -> dict[str, Any]:
        """The wire form (payload `terms`): amounts as decimal strings, bytes as 0x hex."""
        return {
            "buyer": self.buyer,
            "seller": self.seller,
            "operator": self.operator,
            "token": self.token,
            "amount": str(self.amount),
            "deadline": self.deadline,
            "requestHash": "0x" + self.request_hash.hex(),
            "salt": "0x" + self.salt.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Terms:
        """Parse the wire form; raises ValueError naming the field at fault."""
        if not isinstance(data, dict):
            raise ValueError("terms must be a JSON object")
        expected = {"buyer", "seller", "operator", "token", "amount", "deadline", "requestHash", "salt"}
        if set(data) != expected:
            missing, extra = expected - set(data), set(data) - expected
            raise ValueError(f"terms fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in ("buyer", "seller", "operator", "token", "requestHash", "salt"):
            if not isinstance(data[name], str):
                raise ValueError(f"terms.{name} must be a string")
        for name in ("amount", "deadline"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"terms.{name} must be an integer or a decimal string")
            if isinstance(value, str) and not value.isdigit():
                raise ValueError(f"terms.{name} must be a decimal string, got {value!r}")
        try:
            return cls(
                buyer=data["buyer"],
                seller=data["seller"],
                operator=data["operator"],
                token=data["token"],
                amount=int(data["amount"]),
                deadline=int(data["deadline"]),
                request_hash=data["requestHash"],
                salt=data["salt"],
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid terms: {exc}") from exc

    def with_(self, **changes: Any) -> Terms:
        return replace(self, **changes)


def escrow_id(chain_id: int, escrow: str, terms_hash: bytes) -> bytes:
    """keccak256(abi.encode(chainId, escrow, termsHash)), as X402Escrow.escrowId."""
    return keccak(encode(["uint256", "address", "bytes32"], [chain_id, to_checksum_address(escrow), terms_hash]))


def request_hash(method: str, url: str, body: bytes = b"") -> bytes:
    """Binds a payment to one HTTP request: the method, the advertised resource URL, the body.

    keccak256(abi.encode(REQUEST_TYPEHASH, keccak256(METHOD), keccak256(url), keccak256(body))),
    with the method upper-cased and the URL exactly as the server advertised it
    in `resource.url`.
    """
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "bytes32"],
            [REQUEST_TYPEHASH, keccak(text=method.upper()), keccak(text=url), keccak(body)],
        )
    )


def delivery_hash(body: bytes) -> bytes:
    """keccak256 of the exact response body bytes: what the seller commits to on-chain."""
    return keccak(body)
