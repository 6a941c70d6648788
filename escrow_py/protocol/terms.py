"""Terms of an escrowed payment, and the ids and hashes derived from them.

Shared by every role. The derivations mirror `contracts/X402Escrow.sol`
exactly (a test checks each against the contract's own computation):

    termsHash = keccak256(abi.encode(TERMS_TYPEHASH, buyer, seller, operator, token,
                                     amount, deadline, requestHash, salt))
    id        = keccak256(abi.encode(chainId, escrow, termsHash))

The id is also the ERC-3009 nonce the buyer signs, so an escrow id names its terms.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, ClassVar

from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from pydantic import ConfigDict

from escrow_py.protocol.codec import Address, Bytes32, CamelModel, Uint64, Uint256

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


class State(IntEnum):
    """An escrow's on-chain state (X402Escrow.State)."""

    NONE = 0
    HELD = 1
    RELEASED = 2
    REFUNDED = 3

    @property
    def settled(self) -> bool:
        return self in (State.RELEASED, State.REFUNDED)


class Terms(CamelModel):
    """What the buyer agreed to pay, to whom, and until when (X402Escrow.Terms).

    Addresses are normalised to checksum form and the byte fields to 32 bytes,
    so two Terms that hash alike compare equal. On the wire (the payload's `terms`)
    every field is required and no other is accepted.
    """

    model_config = ConfigDict(extra="forbid")
    WHERE: ClassVar[str] = "terms"

    buyer: Address
    seller: Address
    operator: Address
    token: Address
    amount: Uint256
    deadline: Uint64
    request_hash: Bytes32
    salt: Bytes32

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

    @classmethod
    def from_tuple(cls, values: Sequence[Any]) -> Terms:
        """The inverse of `as_tuple` (an ABI-decoded Terms struct)."""
        return cls(**dict(zip(cls.model_fields, values, strict=True)))

    def hash(self) -> bytes:
        """termsHash, as X402Escrow.termsHash."""
        return _terms_hash(self)

    def escrow_id(self, chain_id: int, escrow: str) -> bytes:
        """The escrow id on `chain_id` at `escrow`; also the ERC-3009 nonce."""
        return escrow_id(chain_id, escrow, self.hash())


# A paid request names its terms several times (the header's escrow id, its verification, the deposit), and every
# copy and replay of a payment brings equal terms again: the ABI encoding and the hashes are worked out once.
@functools.lru_cache(maxsize=4096)
def _terms_hash(terms: Terms) -> bytes:
    return keccak(
        encode(
            ["bytes32", "address", "address", "address", "address", "uint256", "uint64", "bytes32", "bytes32"],
            [TERMS_TYPEHASH, *terms.as_tuple()],
        )
    )


@functools.lru_cache(maxsize=4096)
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
