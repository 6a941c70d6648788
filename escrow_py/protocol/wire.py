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
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address
from pydantic import BaseModel, ValidationError
from x402.http.constants import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse

from escrow_py.protocol.eip3009 import Authorization
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.terms import UINT64_MAX, Terms, parse_uint

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
    "Reason",
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
# The deepest legitimate header nests 4 levels (envelope.accepted.extra, envelope.payload.terms);
# a bound far below Python's recursion limit turns 2,000 nested "[" into a reason, not a RecursionError.
MAX_JSON_DEPTH = 16
# The widest integer the scheme carries is a uint256: 78 decimal digits.
_MAX_INT_DIGITS = 78


class SettlementMode(StrEnum):
    """How a route settles (DESIGN.md section 8), advertised as requirements `extra.settlement`."""

    HOLD = "hold"  # deposit before the handler runs, deliver after
    SERVE_FIRST = "serve-first"  # serve after off-chain checks and an eth_call of the pull; settle later


class SettlementStatus(StrEnum):
    """PAYMENT-RESPONSE `extra.settlement`: where the money of a served payment is."""

    HELD = "held"  # deposited (hold mode), delivery pending or posted
    PENDING = "pending"  # serve-first, the settlement queued: nothing has moved yet
    SETTLED = "settled"  # serve-first, pulled and paid to the seller with the delivery hash


class Reason(StrEnum):
    """Machine-readable failure reasons (x402's and the x402 `escrow` scheme's names where one fits)."""

    INVALID_PAYLOAD = "invalid_payload"
    HEADER_TOO_LARGE = "header_too_large"
    UNSUPPORTED_VERSION = "unsupported_x402_version"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    REQUIREMENTS_MISMATCH = "requirements_mismatch"
    NETWORK_MISMATCH = "network_mismatch"
    ASSET_MISMATCH = "asset_mismatch"
    RECEIVER_MISMATCH = "receiver_mismatch"
    ESCROW_MISMATCH = "escrow_mismatch"
    OPERATOR_MISMATCH = "operator_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"
    REQUEST_HASH_MISMATCH = "request_hash_mismatch"
    TERMS_MISMATCH = "terms_mismatch"
    NONCE_MISMATCH = "nonce_mismatch"
    INVALID_SIGNATURE = "invalid_escrow_signature"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    AUTHORIZATION_NOT_YET_VALID = "authorization_not_yet_valid"
    AUTHORIZATION_USED = "authorization_used"
    DEADLINE_TOO_SOON = "deadline_too_soon"
    DEADLINE_TOO_FAR = "deadline_too_far"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    SIMULATION_FAILED = "simulation_failed"
    DEPOSIT_FAILED = "deposit_failed"
    ESCROW_REFUNDABLE = "escrow_refundable"
    ESCROW_SETTLED = "escrow_settled"
    HANDLER_FAILED_REFUNDED = "handler_failed_refunded"
    # Serve-first: the handler failed before anything moved; the authorization was never used.
    HANDLER_FAILED_NOT_CHARGED = "handler_failed_not_charged"
    # Serve-first refused on a route that does not fall back to hold: an exposure limit is reached,
    # or this buyer left a serve-first settlement unpaid before.
    SERVE_FIRST_LIMIT = "serve_first_limit"
    SERVE_FIRST_REFUSED = "serve_first_refused"
    SETTLEMENT_FAILED = "settlement_failed"  # served first, and the settlement was skipped or expired: unpaid
    # The seller's own side failed, not the payment: answered 503 with Retry-After; send the same payment again.
    CHAIN_UNAVAILABLE = "chain_unavailable"  # the seller's node is down, hung or refused
    OPERATOR_UNFUNDED = "operator_unfunded"  # the seller's operator key cannot pay for gas
    NONCE_CONFLICT = "operator_nonce_conflict"  # the operator key's nonce was taken elsewhere, even after a resync
    DEPOSIT_PENDING = "deposit_pending"  # the deposit was sent and is not confirmed yet (it may still land)
    PAYMENT_IN_PROGRESS = "payment_in_progress"  # another request or replica is handling this payment now
    FACILITATOR_UNAVAILABLE = "facilitator_unavailable"  # the seller's facilitator is down, slow or refused it


def network_of(chain_id: int) -> str:
    """CAIP-2 id of an EVM chain: eip155:84532 for Base Sepolia."""
    return f"eip155:{chain_id}"


def chain_id_of(network: str) -> int:
    namespace, _, reference = network.partition(":")
    # ASCII digits only ("²".isdigit() is true), and no wider than a uint256 chain id.
    if namespace != "eip155" or not (reference.isascii() and reference.isdigit() and len(reference) <= 78):
        raise ProtocolError(Reason.NETWORK_MISMATCH, f"not an EVM CAIP-2 network id: {network!r}")
    return int(reference)


def _address(value: Any, field: str) -> ChecksumAddress:
    if not isinstance(value, str) or not is_address(value):
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"{field} is not an address: {value!r}")
    return to_checksum_address(value)


def _hex_bytes(value: Any, field: str, length: int | None = None) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"{field} must be 0x-prefixed hex")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"{field} is not valid hex") from None
    if length is not None and len(raw) != length:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"{field} must be {length} bytes, got {len(raw)}")
    return raw


# -- requirements --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EscrowExtra:
    """`requirements.extra` of the delivery-escrow scheme."""

    name: str  # the token's EIP-712 domain name
    version: str  # the token's EIP-712 domain version
    escrow: ChecksumAddress
    operator: ChecksumAddress
    request_hash: bytes
    settlement: SettlementMode = SettlementMode.HOLD

    def __post_init__(self) -> None:
        # Equal requirements must compare equal whatever case the addresses came in.
        object.__setattr__(self, "escrow", _address(self.escrow, "escrow"))
        object.__setattr__(self, "operator", _address(self.operator, "operator"))
        object.__setattr__(self, "settlement", _settlement_mode(self.settlement))

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "escrow": self.escrow,
            "operator": self.operator,
            "requestHash": "0x" + self.request_hash.hex(),
            "settlement": self.settlement.value,
        }

    @classmethod
    def from_json(cls, data: Any) -> EscrowExtra:
        if not isinstance(data, dict):
            raise ProtocolError(Reason.INVALID_PAYLOAD, "requirements.extra must be an object")
        for key in ("name", "version"):
            if not isinstance(data.get(key), str):
                raise ProtocolError(Reason.INVALID_PAYLOAD, f"requirements.extra.{key} must be a string")
        return cls(
            name=data["name"],
            version=data["version"],
            escrow=_address(data.get("escrow"), "requirements.extra.escrow"),
            operator=_address(data.get("operator"), "requirements.extra.operator"),
            request_hash=_hex_bytes(data.get("requestHash"), "requirements.extra.requestHash", 32),
            settlement=_settlement_mode(data.get("settlement", SettlementMode.HOLD.value)),
        )


def _settlement_mode(value: Any) -> SettlementMode:
    """requirements.extra.settlement (absent means hold); anything else is refused, not guessed at."""
    try:
        return SettlementMode(value)
    except ValueError:
        modes = [m.value for m in SettlementMode]
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"extra.settlement {value!r} is not one of {modes}") from None


@dataclass(frozen=True, slots=True)
class EscrowRequirements:
    """A typed `delivery-escrow` entry of `accepts`."""

    network: str
    amount: int
    asset: ChecksumAddress
    pay_to: ChecksumAddress
    max_timeout_seconds: int
    extra: EscrowExtra

    def __post_init__(self) -> None:
        object.__setattr__(self, "asset", _address(self.asset, "asset"))
        object.__setattr__(self, "pay_to", _address(self.pay_to, "payTo"))

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    def to_model(self) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=SCHEME,
            network=self.network,
            asset=self.asset,
            amount=str(self.amount),
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra=self.extra.to_json(),
        )

    @classmethod
    def from_model(cls, model: PaymentRequirements) -> EscrowRequirements:
        if model.scheme != SCHEME:
            raise ProtocolError(Reason.UNSUPPORTED_SCHEME, f"scheme {model.scheme!r} is not {SCHEME!r}")
        chain_id_of(model.network)
        try:
            amount = parse_uint(model.amount, "amount")
        except ValueError as exc:
            raise ProtocolError(Reason.INVALID_PAYLOAD, str(exc)) from None
        if amount == 0:
            raise ProtocolError(Reason.INVALID_PAYLOAD, "amount must be a positive integer, got 0")
        if not 0 < model.max_timeout_seconds <= UINT64_MAX:
            raise ProtocolError(Reason.INVALID_PAYLOAD, "maxTimeoutSeconds must be positive and fit a uint64")
        return cls(
            network=model.network,
            amount=amount,
            asset=_address(model.asset, "asset"),
            pay_to=_address(model.pay_to, "payTo"),
            max_timeout_seconds=model.max_timeout_seconds,
            extra=EscrowExtra.from_json(model.extra),
        )


# -- payload -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EscrowPayload:
    """`payload` of a delivery-escrow PAYMENT-SIGNATURE."""

    authorization: Authorization
    signature: bytes
    terms: Terms

    def to_json(self) -> dict[str, Any]:
        return {
            "authorization": self.authorization.to_json(),
            "signature": "0x" + self.signature.hex(),
            "terms": self.terms.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> EscrowPayload:
        if not isinstance(data, dict):
            raise ProtocolError(Reason.INVALID_PAYLOAD, "payload must be an object")
        try:
            authorization = Authorization.from_json(data.get("authorization"))
            terms = Terms.from_json(data.get("terms"))
        except ValueError as exc:
            raise ProtocolError(Reason.INVALID_PAYLOAD, str(exc)) from None
        signature = _hex_bytes(data.get("signature"), "payload.signature")
        if not 65 <= len(signature) <= 4096:
            raise ProtocolError(Reason.INVALID_PAYLOAD, f"payload.signature has {len(signature)} bytes")
        return cls(authorization=authorization, signature=signature, terms=terms)


# -- settlement ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SettlementExtra:
    """`extra` of a delivery-escrow PAYMENT-RESPONSE."""

    escrow_id: bytes
    deadline: int
    delivery_hash: bytes | None = None
    delivery_transaction: bytes | None = None
    refund_transaction: bytes | None = None
    state: str | None = None  # "held", "released", "refunded" as far as the seller knows
    settlement: SettlementStatus | None = None  # held, pending (serve-first, queued) or settled

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"escrowId": "0x" + self.escrow_id.hex(), "deadline": self.deadline}
        for key, value in (
            ("deliveryHash", self.delivery_hash),
            ("deliveryTransaction", self.delivery_transaction),
            ("refundTransaction", self.refund_transaction),
        ):
            if value is not None:
                data[key] = "0x" + value.hex()
        if self.state is not None:
            data["state"] = self.state
        if self.settlement is not None:
            data["settlement"] = self.settlement.value
        return data

    @classmethod
    def from_json(cls, data: Any) -> SettlementExtra:
        if not isinstance(data, dict):
            raise ProtocolError(Reason.INVALID_PAYLOAD, "settlement extra must be an object")
        deadline = data.get("deadline")
        if isinstance(deadline, bool) or not isinstance(deadline, int) or not 0 <= deadline <= UINT64_MAX:
            raise ProtocolError(Reason.INVALID_PAYLOAD, "settlement extra.deadline must be a uint64 integer")

        def optional(key: str, length: int) -> bytes | None:
            return None if data.get(key) is None else _hex_bytes(data[key], f"extra.{key}", length)

        state = data.get("state")
        try:
            settlement = None if data.get("settlement") is None else SettlementStatus(data["settlement"])
        except ValueError:
            raise ProtocolError(
                Reason.INVALID_PAYLOAD, f"settlement extra.settlement {data['settlement']!r} is unknown"
            ) from None
        return cls(
            escrow_id=_hex_bytes(data.get("escrowId"), "extra.escrowId", 32),
            deadline=deadline,
            delivery_hash=optional("deliveryHash", 32),
            delivery_transaction=optional("deliveryTransaction", 32),
            refund_transaction=optional("refundTransaction", 32),
            state=state if isinstance(state, str) else None,
            settlement=settlement,
        )


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


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"a JSON integer of {len(text)} digits is wider than a uint256")
    return int(text)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"JSON number {text[:40]} overflows")
    return number


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _decode_header(value: str) -> Any:
    """base64 of a JSON object, with every size bounded before anything is built from it."""
    if len(value) > MAX_HEADER_BYTES:
        raise ProtocolError(Reason.HEADER_TOO_LARGE, f"header of {len(value)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(Reason.INVALID_PAYLOAD, "header is not valid base64") from None
    if (depth := _json_depth(raw)) > MAX_JSON_DEPTH:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"header JSON nests {depth} levels, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"header is not JSON: {detail[:120]}") from None


def _validate(data: Any, model: type[_Model], header: str) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"{header}: {_first_error(exc)}") from None


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


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}"


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
