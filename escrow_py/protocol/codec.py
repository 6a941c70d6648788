"""How every protocol value is read and written: one camelCase model base and its field types.

Every message of the scheme (terms, authorizations, the requirements' `extra`, the payload,
the settlement's `extra`) is a `CamelModel`: a frozen pydantic model whose fields are snake_case
in Python and camelCase on the wire, as the x402 SDK's own models are. Its fields use the
annotated types below, so each rule is written once for the whole package:

    Address   an EIP-55 checksummed address; any case in, checksummed out; a wrong checksum refused
    Bytes32   exactly 32 bytes; 0x-hex on the wire
    Hex       0x-hex bytes of any length
    Uint256   an unsigned integer up to 2**256 - 1; a JSON integer or an ASCII decimal string in,
              a decimal string out (as x402's `exact` scheme writes amounts)
    Uint64    the same up to 2**64 - 1, written as a JSON integer

`parse_hex`, `parse_uint` and `parse_address` are the package's one hex, uint and address
parser; the types use the same rules, and any code that reads such a value outside a model
(a stored row) calls them; an address setting (a config field, an option, a registry entry) goes
through `setting_address`, the same rule raising ConfigError. `load_json` reads JSON from an
untrusted party.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Self, overload

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, ValidationError
from pydantic.alias_generators import to_camel

from escrow_py.protocol.errors import ConfigError, ProtocolError
from escrow_py.protocol.reasons import Reason

UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1

# ASCII decimal digits only: str.isdigit() and int() also take "²" or "١٢", which the wire must not.
_DECIMAL = re.compile(r"[0-9]{1,78}")
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})*")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_WIDTHS = {UINT64_MAX: "uint64", UINT256_MAX: "uint256"}
# The deepest legitimate header nests 4 levels (envelope.accepted.extra, envelope.payload.terms);
# a bound far below Python's recursion limit turns 2,000 nested "[" into a refusal, not a RecursionError.
MAX_JSON_DEPTH = 16


def _uint(value: object, maximum: int = UINT256_MAX) -> int:
    """The uint rule; the ValueError says what is wrong and leaves naming the field to the caller."""
    width = _WIDTHS.get(maximum, f"integer in [0, {maximum}]")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a {width} (an integer or a decimal string), got {type(value).__name__}")
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError(f"must be a {width} as a decimal string of at most 78 digits, got {value[:80]!r}")
    number = int(value)
    if not 0 <= number <= maximum:
        raise ValueError(f"must be a {width} (in [0, {maximum}]), got {str(value)[:80]}")
    return number


def _hex(value: object, length: int | None = None) -> bytes:
    """The hex rule: bytes as they are, or a 0x-prefixed string of hex digit pairs (nothing else)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    elif isinstance(value, str):
        if not _HEX.fullmatch(value):
            raise ValueError(f"must be 0x-prefixed hex, got {value[:80]!r}")
        raw = bytes.fromhex(value[2:])
    else:
        raise ValueError(f"must be 0x-prefixed hex, got {type(value).__name__}")
    if length is not None and len(raw) != length:
        raise ValueError(f"must be {length} bytes, got {len(raw)}")
    return raw


def _address(value: object) -> ChecksumAddress:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"is not an address: {str(value)[:80]!r}")
    return _checksummed(value)


# A paid request names the same few addresses (seller, operator, token, escrow) again and again, and
# each EIP-55 checksum is a keccak: remember the last ones.
@lru_cache(maxsize=4096)
def _checksummed(value: str) -> ChecksumAddress:
    checksummed = to_checksum_address(value)
    digits = value[2:]
    # EIP-55: mixed case is a checksum, and a wrong one is a typo (or a lie), not another spelling.
    if value != checksummed and not (digits.islower() or digits.isupper()):
        raise ValueError(f"is not an address: {value!r} has a wrong EIP-55 checksum")
    return checksummed


def parse_uint(value: object, field: str, maximum: int = UINT256_MAX) -> int:
    """An unsigned integer of the wire form: a JSON integer or an ASCII decimal string, in [0, maximum].

    Every number a payment carries goes through here, so a value the ABI encoder or the
    contract would refuse (2**256, -1, "1e3", a 5,000-digit string) is refused at decode
    time with the field's name, never later as an encoder error. Raises ValueError.
    """
    try:
        return _uint(value, maximum)
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None


def parse_hex(value: object, field: str, length: int | None = None) -> bytes:
    """Bytes, or 0x-hex of them (of `length` bytes when given); raises ValueError naming `field`."""
    try:
        return _hex(value, length)
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None


def parse_address(value: object, field: str) -> ChecksumAddress:
    """An address in any case, checksummed; a mixed-case one with a wrong checksum is refused."""
    try:
        return _address(value)
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None


def setting_address(value: object, field: str) -> ChecksumAddress:
    """A setting that must be an address, by `parse_address`'s rule: 0x and 40 hex digits, any case, a
    mixed-case one with a wrong EIP-55 checksum refused; ConfigError naming `field` otherwise."""
    try:
        return parse_address(value, field)
    except ValueError as exc:
        raise ConfigError(f"{exc} (expected a 0x address)") from None


def network_of(chain_id: int) -> str:
    """CAIP-2 id of an EVM chain: eip155:84532 for Base Sepolia."""
    return f"eip155:{chain_id}"


def chain_id_of(network: str) -> int:
    """The chain id of a CAIP-2 EVM network id (eip155:84532 -> 84532); ProtocolError for any other."""
    namespace, _, reference = network.partition(":")
    # ASCII digits only ("²".isdigit() is true), and no wider than a uint256 chain id.
    if namespace != "eip155" or not (reference.isascii() and reference.isdigit() and len(reference) <= 78):
        raise ProtocolError(Reason.NETWORK_MISMATCH, f"not an EVM CAIP-2 network id: {network!r}")
    return int(reference)


@overload
def to_hex(value: bytes) -> str: ...
@overload
def to_hex(value: None) -> None: ...
def to_hex(value: bytes | None) -> str | None:
    """0x-hex of bytes (None stays None): how the wire, the stores and the logs write bytes."""
    return None if value is None else "0x" + value.hex()


Address = Annotated[ChecksumAddress, PlainValidator(_address)]
Bytes32 = Annotated[bytes, PlainValidator(lambda value: _hex(value, 32)), PlainSerializer(to_hex, when_used="json")]
Hex = Annotated[bytes, PlainValidator(_hex), PlainSerializer(to_hex, when_used="json")]
Uint256 = Annotated[int, PlainValidator(_uint), PlainSerializer(str, when_used="json")]
Uint64 = Annotated[int, PlainValidator(lambda value: _uint(value, UINT64_MAX))]


class CamelModel(BaseModel):
    """Base of every message of the scheme: immutable, snake_case in Python, camelCase on the wire.

    Build one in Python with field names (`Terms(request_hash=...)`), values are validated and
    normalised on the way in. `to_json()` is the wire form; `from_json(data)` reads it, by the
    camelCase names only, and raises ProtocolError(INVALID_PAYLOAD) naming the field at fault
    (`payload.terms.amount must be a uint256 ...`). `WHERE` is how messages name the model.
    """

    # Python code names fields in snake_case (and the signature says so); only from_json reads camelCase.
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=False, frozen=True)
    WHERE: ClassVar[str] = "message"

    def to_json(self) -> dict[str, Any]:
        """The wire form: camelCase keys, bytes as 0x-hex, uint256 as decimal strings, no null fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def from_json(cls, data: Any, where: str | None = None) -> Self:
        where = where or cls.WHERE
        if not isinstance(data, dict):
            raise invalid_payload(f"{where} must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data, by_alias=True, by_name=False)
        except ValidationError as exc:
            raise invalid_payload(describe(exc, where)) from None

    def with_(self, **changes: Any) -> Self:
        """A copy with `changes` (by field name), validated like a new model."""
        return type(self).model_validate({**self.__dict__, **changes})


def invalid_payload(message: str) -> ProtocolError:
    return ProtocolError(Reason.INVALID_PAYLOAD, message)


def describe(exc: ValidationError, where: str) -> str:
    """The first problem of a ValidationError, as `where.field.path <what is wrong>`."""
    errors = exc.errors(include_url=False)
    missing = [_path(e["loc"]) for e in errors if e["type"] == "missing"]
    unexpected = [_path(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if missing or unexpected:
        parts = [f"{where}.{name} is missing" for name in missing]
        parts += [f"{where}.{name} is unexpected (not a field of {where})" for name in unexpected]
        return "; ".join(parts)
    error = errors[0]
    cause = (error.get("ctx") or {}).get("error")
    detail = str(cause) if isinstance(cause, ValueError) else error["msg"]
    location = _path(error["loc"])
    return f"{where}.{location} {detail}" if location else f"{where} {detail}"


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_json(raw: bytes) -> Any:
    """JSON from an untrusted party, every size bounded before anything is built from it.

    Refuses (ValueError) nesting deeper than MAX_JSON_DEPTH, integers wider than a uint256,
    NaN and the infinities, and text that is not UTF-8.
    """
    # A text with no more brackets than the limit cannot nest past it (counted at C speed): only one with more,
    # which honest traffic never sends, is walked byte by byte.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and (depth := _json_depth(raw)) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nests {depth} levels, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ValueError(f"is not JSON: {detail[:120]}") from None


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
    # The widest integer the scheme carries is a uint256: 78 decimal digits.
    if len(text.lstrip("-")) > 78:
        raise ValueError(f"a JSON integer of {len(text)} digits is wider than a uint256")
    return int(text)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"JSON number {text[:40]} overflows")
    return number


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")
