"""The x402 version 2 wire format of the `delivery-escrow` scheme (DESIGN.md section 3).

Shared by the seller, the buyer and the keeper. The envelope types are the
official `x402` SDK's pydantic models (PaymentRequired, PaymentPayload,
SettleResponse); this module adds the scheme's own parts:

    requirements.extra  {name, version, escrow, operator, requestHash, [settlement]}
    payload             {authorization: {...}, signature: "0x...", terms: {...}}
    settlement.extra    {escrowId, deadline, deliveryHash, [deliveryTransaction], [refundTransaction], [state],
                         [settlement]}
    503 (seller side)   {error: reason, message} + Retry-After (`Unavailable`): resend the same payment

Every decoder raises ProtocolError with a machine-readable `reason` (`Reason`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, PlainSerializer, PlainValidator, ValidationError, field_validator
from x402.http.constants import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse

from escrow_py.protocol.codec import (
    Address,
    Bytes32,
    CamelModel,
    Hex,
    Uint64,
    Uint256,
    chain_id_of,
    describe,
    load_json,
    network_of,
)
from escrow_py.protocol.eip3009 import Authorization, TokenDomain
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State, Terms

SCHEME = "delivery-escrow"
X402_VERSION = 2

# Header names come from the SDK: one definition for the whole ecosystem.
__all__ = [
    "DEPOSIT_MAY_BE_PENDING",
    "MAX_HEADER_BYTES",
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "SCHEME",
    "SELLER_SIDE_REASONS",
    "UNAVAILABLE_STATUS",
    "X402_VERSION",
    "EscrowExtra",
    "EscrowPayload",
    "EscrowRequirements",
    "SettlementExtra",
    "SettlementMode",
    "SettlementStatus",
    "Unavailable",
    "chain_id_of",
    "decode_payment_required",
    "decode_payment_response",
    "decode_payment_signature",
    "encode_header",
    "encode_payment_required",
    "encode_payment_response",
    "encode_payment_signature",
    "network_of",
]

_Model = TypeVar("_Model", bound=BaseModel)

# A PAYMENT-SIGNATURE of this scheme is about 2 KiB; anything far larger is refused unread.
MAX_HEADER_BYTES = 16 * 1024
# A smart wallet's (EIP-1271) signature may be longer than an EOA's 65 bytes, but not without bound.
MAX_SIGNATURE_BYTES = 4096


class SettlementMode(StrEnum):
    """How a route settles (DESIGN.md section 8), advertised as requirements `extra.settlement`."""

    HOLD = "hold"  # deposit before the handler runs, deliver after
    SERVE_FIRST = "serve-first"  # serve after off-chain checks and an eth_call of the pull; settle later


class SettlementStatus(StrEnum):
    """PAYMENT-RESPONSE `extra.settlement`: where the money of a served payment is."""

    HELD = "held"  # deposited (hold mode), delivery pending or posted
    PENDING = "pending"  # serve-first, the settlement queued: nothing has moved yet
    SETTLED = "settled"  # serve-first, pulled and paid to the seller with the delivery hash


# -- requirements --------------------------------------------------------------------------


class EscrowExtra(CamelModel):
    """`requirements.extra` of the delivery-escrow scheme."""

    WHERE: ClassVar[str] = "requirements.extra"

    name: str  # the token's EIP-712 domain name
    version: str  # the token's EIP-712 domain version
    escrow: Address
    operator: Address
    request_hash: Bytes32
    settlement: SettlementMode = SettlementMode.HOLD  # absent means hold; anything unknown is refused


class EscrowRequirements(CamelModel):
    """A typed `delivery-escrow` entry of `accepts`."""

    WHERE: ClassVar[str] = "requirements"

    network: str
    amount: Uint256
    asset: Address
    pay_to: Address
    max_timeout_seconds: Uint64
    extra: EscrowExtra

    @field_validator("amount", "max_timeout_seconds")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be positive, got 0")
        return value

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    def token_domain(self) -> TokenDomain:
        """The EIP-712 domain the buyer signs in: the token's, as the offer names it."""
        return TokenDomain(
            name=self.extra.name, version=self.extra.version, chain_id=self.chain_id, verifying_contract=self.asset
        )

    def to_model(self) -> PaymentRequirements:
        return PaymentRequirements.model_validate({"scheme": SCHEME, **self.to_json()})

    @classmethod
    def from_model(cls, model: PaymentRequirements) -> EscrowRequirements:
        if model.scheme != SCHEME:
            raise ProtocolError(Reason.UNSUPPORTED_SCHEME, f"scheme {model.scheme!r} is not {SCHEME!r}")
        chain_id_of(model.network)
        return cls.from_json(model.model_dump(by_alias=True))


# -- payload -------------------------------------------------------------------------------


class EscrowPayload(CamelModel):
    """`payload` of a delivery-escrow PAYMENT-SIGNATURE."""

    WHERE: ClassVar[str] = "payload"

    authorization: Authorization
    signature: Hex  # 65 bytes from a key; an EIP-1271 wallet's may be longer
    terms: Terms

    @field_validator("signature")
    @classmethod
    def _signature_size(cls, value: bytes) -> bytes:
        if not 65 <= len(value) <= MAX_SIGNATURE_BYTES:
            raise ValueError(f"has {len(value)} bytes, not 65 to {MAX_SIGNATURE_BYTES}")
        return value


# -- settlement ----------------------------------------------------------------------------


def _state_name(value: object) -> State | None:
    """An escrow state by its lower-case name; a name this version does not know is no state at all."""
    if isinstance(value, State):
        return value
    if isinstance(value, str) and value.upper() in State.__members__ and value.islower():
        return State[value.upper()]
    return None


# The settlement's `state`: the on-chain State written as its lower-case name ("held").
StateName = Annotated[
    State | None, PlainValidator(_state_name), PlainSerializer(lambda s: s.name.lower(), when_used="json-unless-none")
]


class SettlementExtra(CamelModel):
    """`extra` of a delivery-escrow PAYMENT-RESPONSE."""

    WHERE: ClassVar[str] = "settlement.extra"

    escrow_id: Bytes32
    deadline: Uint64
    delivery_hash: Bytes32 | None = None
    delivery_transaction: Bytes32 | None = None
    refund_transaction: Bytes32 | None = None
    state: StateName = None  # held, released or refunded, as far as the seller knows (advisory)
    settlement: SettlementStatus | None = None  # held, pending (serve-first, queued) or settled


# -- the seller's own failures ---------------------------------------------------------------

# A failure on the seller's side, not the payment's, is a 503 with Retry-After (seconds) and the
# JSON body {"error": reason, "message": ...}, without PAYMENT-REQUIRED: send the same
# PAYMENT-SIGNATURE again after Retry-After, never a new one.
UNAVAILABLE_STATUS = 503
SELLER_SIDE_REASONS = frozenset(
    {
        Reason.CHAIN_UNAVAILABLE,
        Reason.OPERATOR_UNFUNDED,
        Reason.NONCE_CONFLICT,
        Reason.DEPOSIT_PENDING,
        Reason.PAYMENT_IN_PROGRESS,
        Reason.FACILITATOR_UNAVAILABLE,
        Reason.SELLER_HOOK_FAILED,
    }
)
# After these a deposit of the payment may already be on its way (sent, or being sent by another
# request or replica); after the others the node refused the seller's transaction, nothing was sent.
DEPOSIT_MAY_BE_PENDING = frozenset(
    {Reason.CHAIN_UNAVAILABLE, Reason.DEPOSIT_PENDING, Reason.PAYMENT_IN_PROGRESS, Reason.FACILITATOR_UNAVAILABLE}
)
# A body larger than this is not the seller's 503; a Retry-After of more digits is not a delay.
_MAX_UNAVAILABLE_BODY = 4096
_MAX_RETRY_AFTER_DIGITS = 9


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A 503 from the seller's own side: `reason` (one of SELLER_SIDE_REASONS), its message, Retry-After."""

    reason: Reason
    message: str
    retry_after: int

    def body(self) -> bytes:
        return json.dumps({"error": str(self.reason), "message": self.message}).encode()

    @classmethod
    def decode(cls, status: int, headers: Any, body: bytes) -> Unavailable | None:
        """The seller's 503, or None for any other answer (a proxy's 503, a 402, a malformed body, or a
        handler's own 503, which comes with PAYMENT-RESPONSE: the payment's outcome, final).

        `headers` is any case-insensitive mapping (httpx.Headers, Starlette's). A missing or
        unreadable Retry-After (an HTTP date, garbage) counts as 1 second.
        """
        if status != UNAVAILABLE_STATUS:
            return None
        if headers.get(PAYMENT_REQUIRED_HEADER) is not None or headers.get(PAYMENT_RESPONSE_HEADER) is not None:
            return None
        if len(body) > _MAX_UNAVAILABLE_BODY:
            return None
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or data.get("error") not in SELLER_SIDE_REASONS:
            return None
        message = data.get("message")
        raw = str(headers.get("retry-after") or "").strip()
        retry_after = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_RETRY_AFTER_DIGITS else 1
        return cls(Reason(data["error"]), message[:500] if isinstance(message, str) else "", retry_after)


# -- header codecs -------------------------------------------------------------------------


def encode_header(data: dict[str, Any]) -> str:
    """base64 of compact JSON, the x402 header encoding."""
    return base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _decode_header(value: str) -> Any:
    """base64 of a JSON object, with every size bounded before anything is built from it."""
    if len(value) > MAX_HEADER_BYTES:
        raise ProtocolError(Reason.HEADER_TOO_LARGE, f"header of {len(value)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(Reason.INVALID_PAYLOAD, "header is not valid base64") from None
    try:
        return load_json(raw)
    except ValueError as exc:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"header {exc}") from None


def _validate(data: Any, model: type[_Model], header: str) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(Reason.INVALID_PAYLOAD, describe(exc, header)) from None


def _encode_model(model: BaseModel) -> str:
    return encode_header(model.model_dump(by_alias=True, exclude_none=True))


def encode_payment_required(model: PaymentRequired) -> str:
    return _encode_model(model)


def decode_payment_required(value: str) -> PaymentRequired:
    return _validate(_decode_header(value), PaymentRequired, PAYMENT_REQUIRED_HEADER)


def encode_payment_signature(model: PaymentPayload) -> str:
    return _encode_model(model)


def decode_payment_signature(value: str) -> PaymentPayload:
    """Decode PAYMENT-SIGNATURE into the SDK's model; the scheme payload is parsed by EscrowPayload."""
    data = _decode_header(value)
    if not isinstance(data, dict):
        raise ProtocolError(Reason.INVALID_PAYLOAD, "PAYMENT-SIGNATURE must be a JSON object")
    if data.get("x402Version") != X402_VERSION:
        raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"x402Version {data.get('x402Version')!r} is not 2")
    return _validate(data, PaymentPayload, PAYMENT_SIGNATURE_HEADER)


def encode_payment_response(model: SettleResponse) -> str:
    return _encode_model(model)


def decode_payment_response(value: str) -> SettleResponse:
    return _validate(_decode_header(value), SettleResponse, PAYMENT_RESPONSE_HEADER)


def payment_required(
    resource_url: str, accepts: list[PaymentRequirements], *, description: str | None = None,
    mime_type: str | None = None, error: str | None = None,
) -> PaymentRequired:  # fmt: skip
    return PaymentRequired(
        x402_version=X402_VERSION,
        error=error,
        resource=ResourceInfo(url=resource_url, description=description, mime_type=mime_type),
        accepts=accepts,
    )
