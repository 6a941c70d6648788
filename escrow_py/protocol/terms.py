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
import re
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


# ASCII decimal digits only: str.isdigit() and int() also take "²" or "١٢", which the wire must not.
_DECIMAL = re.compile(r"[0-9]{1,78}")


def parse_uint(value: object, field: str, maximum: int = UINT256_MAX) -> int:
    """An unsigned integer field of the wire form: a JSON integer or an ASCII decimal string, in [0, maximum].

    Every number a payment carries goes through here, so a value the ABI encoder or the
    contract would refuse (2**256, -1, "1e3", a 5,000-digit string) is refused at decode
    time with the field's name, never later as an encoder error. Raises ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{field} must be an integer or a decimal string, got {type(value).__name__}")
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError(f"{field} must be a decimal string of at most 78 digits, got {value[:80]!r}")
    number = int(value)
    if not 0 <= number <= maximum:
        raise ValueError(f"{field} must be an integer in [0, {maximum}], got {str(value)[:80]}")
    return number


def _uint(value: int | str, field: str, maximum: int) -> int:
    return parse_uint(value, field, maximum)


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
        amount = parse_uint(data["amount"], "terms.amount")
        deadline = parse_uint(data["deadline"], "terms.deadline", UINT64_MAX)
        try:
            return cls(
                buyer=data["buyer"],
                seller=data["seller"],
                operator=data["operator"],
                token=data["token"],
                amount=amount,
                deadline=deadline,
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


# RFC 3986 section 2.3: these are never percent-encoded in the canonical form.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Bytes kept as they are in a path or query besides the unreserved ones: the sub-delims,
# ":" and "@" (pchar), and "/" and "?" (query). Everything else is percent-encoded.
_KEPT = frozenset(b"!$&'()*+,;=:@/?")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _normalise_component(raw: bytes) -> str:
    """Percent-encoding normalisation (RFC 3986 sections 2.1, 2.3, 6.2.2.2) of a path or query.

    A `%XX` triple stays encoded (upper-case hex) unless it names an unreserved byte, which is
    decoded; a bare `%` not followed by two hex digits is itself encoded; every other byte outside
    the unreserved and kept sets (spaces, non-ASCII UTF-8, controls) is encoded. So `/u/été`,
    `/u/%c3%a9t%C3%A9` and `/u/%C3%A9t%C3%A9` are one URL, while `%2F` stays distinct from `/`
    and `+` stays a plus (it is not a space in a URL).
    """
    out: list[str] = []
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25 and (match := _PCT.match(raw, i)):
            value = int(match.group(1), 16)
            out.append(chr(value) if value in _UNRESERVED else f"%{value:02X}")
            i += 3
            continue
        out.append(chr(byte) if byte in _UNRESERVED or byte in _KEPT else f"%{byte:02X}")
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, for an absolute path."""
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def canonical_url(url: str | bytes) -> str:
    """The one form of a resource URL that `resource.url` and the requestHash use (docs/design.md).

    Both sides derive it the same way from what went over the wire: the client from the URL it
    sends, the server from the scheme, the Host header and the raw request target. RFC 3986
    syntax-based normalisation:

    - scheme and host lower-cased; the scheme's default port dropped (`:80`, `:443`);
    - an empty path is `/`; dot segments (`/a/../b`) removed;
    - path and query percent-encoding normalised by `_normalise_component` (Unicode is
      UTF-8 and percent-encoded, spaces are `%20`, hex digits upper case, `+` kept);
    - the query kept as sent: key order, repeated and empty keys untouched; an empty query
      (a trailing `?`) dropped; any fragment dropped (it never goes over the wire).

    Raises ValueError for a URL with no scheme or host.
    """
    raw = url.encode("utf-8") if isinstance(url, str) else bytes(url)
    scheme, sep, rest = raw.partition(b"://")
    if not sep or not scheme or not scheme.isascii() or not scheme.isalpha():
        raise ValueError(f"not an absolute http(s) URL: {raw[:200]!r}")
    rest = rest.split(b"#", 1)[0]
    end = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if found != -1:
            end = min(end, found)
    authority, target = rest[:end], rest[end:]
    if not authority or not authority.isascii() or b"@" in authority:
        raise ValueError(f"URL host must be plain ASCII with no userinfo: {authority[:200]!r}")
    scheme_text = scheme.decode("ascii").lower()
    host = authority.decode("ascii").lower()
    default = _DEFAULT_PORTS.get(scheme_text)
    if default is not None and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    path, _, query = target.partition(b"?")
    canonical_path = _remove_dot_segments(_normalise_component(path or b"/"))
    canonical_query = _normalise_component(query)
    url_text = f"{scheme_text}://{host}{canonical_path}"
    return f"{url_text}?{canonical_query}" if canonical_query else url_text


def request_hash(method: str, url: str, body: bytes = b"") -> bytes:
    """Binds a payment to one HTTP request: the method, the advertised resource URL, the body.

    keccak256(abi.encode(REQUEST_TYPEHASH, keccak256(METHOD), keccak256(url), keccak256(body))),
    with the method upper-cased and the URL in its canonical form (`canonical_url`), which is
    also what the server advertises in `resource.url`. A URL is canonicalised here too, so a
    caller cannot hash a form the other side would not.
    """
    url = canonical_url(url)
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "bytes32"],
            [REQUEST_TYPEHASH, keccak(text=method.upper()), keccak(text=url), keccak(body)],
        )
    )


def delivery_hash(body: bytes) -> bytes:
    """keccak256 of the exact response body bytes: what the seller commits to on-chain."""
    return keccak(body)
