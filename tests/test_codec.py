"""escrow_py.protocol.codec: the one hex, uint and address rule of the package, and the model base."""

from __future__ import annotations

import pytest

from escrow_py.protocol import codec
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.wire import EscrowExtra

CHECKSUMMED = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55's own example


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0x", b""), ("0x00ff", b"\0\xff"), ("0xABcd", b"\xab\xcd"), (b"\1\2", b"\1\2"), (bytearray(b"\3"), b"\3")],
)
def test_hex_takes_0x_digit_pairs_and_bytes(value: object, expected: bytes) -> None:
    assert codec.parse_hex(value, "x") == expected


@pytest.mark.parametrize(
    "value", ["00ff", "0x0", "0x 00", "0x00 ", "0xgg", "0X00", "0x\u0661\u0662", 12, None, ["0x00"]]
)
def test_hex_refuses_anything_else_naming_the_field(value: object) -> None:
    # bytes.fromhex alone would take spaces ("0x 00") and the unprefixed form.
    with pytest.raises(ValueError, match=r"^salt must be 0x-prefixed hex"):
        codec.parse_hex(value, "salt")


def test_hex_length_is_checked() -> None:
    assert codec.parse_hex("0x" + "11" * 32, "id", 32) == b"\x11" * 32
    with pytest.raises(ValueError, match="id must be 32 bytes, got 31"):
        codec.parse_hex("0x" + "11" * 31, "id", 32)


@pytest.mark.parametrize(
    ("value", "maximum", "expected"),
    [(0, codec.UINT64_MAX, 0), ("18446744073709551615", codec.UINT64_MAX, 2**64 - 1), (2**256 - 1, codec.UINT256_MAX,
     2**256 - 1), ("0010", codec.UINT256_MAX, 10)],
)  # fmt: skip
def test_uint_takes_integers_and_ascii_decimal_strings(value: object, maximum: int, expected: int) -> None:
    assert codec.parse_uint(value, "n", maximum) == expected


@pytest.mark.parametrize(
    ("value", "maximum", "fragment"),
    [(-1, codec.UINT256_MAX, "a uint256 (in [0,"), (2**64, codec.UINT64_MAX, "a uint64 (in [0,"),
     ("1e3", codec.UINT256_MAX, "decimal string"), ("\u0661", codec.UINT256_MAX, "decimal string"),
     ("9" * 79, codec.UINT256_MAX, "at most 78 digits"), (True, codec.UINT256_MAX, "got bool"),
     (1.0, codec.UINT256_MAX, "got float"), (" 1", codec.UINT256_MAX, "decimal string")],
)  # fmt: skip
def test_uint_refuses_what_the_abi_would_and_names_the_field(value: object, maximum: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=r"^amount ") as info:
        codec.parse_uint(value, "amount", maximum)
    assert fragment in str(info.value)


def test_address_is_checksummed_and_a_wrong_checksum_is_refused() -> None:
    assert codec.parse_address(CHECKSUMMED.lower(), "a") == CHECKSUMMED
    assert codec.parse_address(CHECKSUMMED, "a") == CHECKSUMMED
    wrong = CHECKSUMMED.replace("a", "A", 1)  # mixed case that is not EIP-55
    for bad in (wrong, "0x1234", CHECKSUMMED[2:] + "00", b"\0" * 20, None):
        with pytest.raises(ValueError, match=r"^a is not an address"):
            codec.parse_address(bad, "a")


def _extra() -> EscrowExtra:
    return EscrowExtra(name="USDC", version="2", escrow=CHECKSUMMED, operator=CHECKSUMMED, request_hash=b"\1" * 32)


def test_a_model_reads_camel_case_only_and_says_where_a_field_is_wrong() -> None:
    wire_form = _extra().to_json()
    assert "requestHash" in wire_form and EscrowExtra.from_json(wire_form) == _extra()
    snake = {**wire_form, "request_hash": wire_form["requestHash"]}
    del snake["requestHash"]
    with pytest.raises(ProtocolError, match=r"requirements\.extra\.requestHash is missing") as info:
        EscrowExtra.from_json(snake)
    assert info.value.reason == Reason.INVALID_PAYLOAD and isinstance(info.value, ValueError)
    with pytest.raises(ProtocolError, match=r"requirements\.extra\.escrow is not an address: '0x12'"):
        EscrowExtra.from_json({**_extra().to_json(), "escrow": "0x12"})
    with pytest.raises(ProtocolError, match="must be a JSON object, got list"):
        EscrowExtra.from_json([])


def test_models_are_immutable_and_with_validates_the_change() -> None:
    extra = _extra()
    with pytest.raises(ValueError, match="frozen"):
        extra.name = "other"  # type: ignore[misc]
    assert extra.with_(escrow=CHECKSUMMED.lower()).escrow == CHECKSUMMED
    with pytest.raises(ValueError, match="must be 32 bytes"):
        extra.with_(request_hash=b"short")


def test_untrusted_json_is_bounded() -> None:
    assert codec.load_json(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    for raw, fragment in [(b"[" * 17 + b"]" * 17, "nests 17 levels"), (b"1" * 79, "wider than a uint256"),
                          (b"NaN", "is not JSON"), (b"1e999", "overflows"), (b"\xff", "is not JSON")]:  # fmt: skip
        with pytest.raises(ValueError, match=fragment):
            codec.load_json(raw)


def test_the_depth_limit_counts_nesting_not_brackets() -> None:
    limit = codec.MAX_JSON_DEPTH
    assert codec.load_json(b"[" * limit + b"]" * limit) == _nested(limit)
    # More brackets than the limit, none of them nesting past it: in strings, and side by side.
    assert codec.load_json(b'["' + b"[{" * limit + b'"]') == ["[{" * limit]
    assert codec.load_json(b"[" + b"[]," * limit + b"[]]") == [[]] * (limit + 1)
    # Past it, with a closing bracket in a string (after an escaped quote) that must not count.
    deep = b'["\\"]",' + b"[" * limit + b"]" * limit + b"]"
    objects = b'{"a":' * (limit + 1) + b"1" + b"}" * (limit + 1)  # objects count as arrays do
    for raw in (deep, objects):
        with pytest.raises(ValueError, match=f"nests {limit + 1} levels"):
            codec.load_json(raw)


def _nested(depth: int) -> object:
    return [] if depth == 1 else [_nested(depth - 1)]
