"""escrow_py.protocol.terms: request and delivery hashes, the JSON wire form and its validation."""

from __future__ import annotations

import os
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from escrow_py.protocol.terms import State, Terms, delivery_hash, request_hash

A = to_checksum_address("0x" + "11" * 20)
B = to_checksum_address("0x" + "22" * 20)


def _terms() -> Terms:
    return Terms(
        buyer=A,
        seller=B,
        operator=B,
        token=A,
        amount=10_000,
        deadline=1_900_000_000,
        request_hash=request_hash("GET", "https://api.example/x"),
        salt=os.urandom(32),
    )


def test_request_hash_is_deterministic_and_sensitive_to_each_part() -> None:
    base = request_hash("POST", "https://api.example/data", b'{"q": 1}')
    assert base == request_hash("POST", "https://api.example/data", b'{"q": 1}')
    assert base == request_hash("post", "https://api.example/data", b'{"q": 1}')  # the method is upper-cased
    assert len(base) == 32
    variants = {
        request_hash("PUT", "https://api.example/data", b'{"q": 1}'),
        request_hash("POST", "https://api.example/data2", b'{"q": 1}'),
        request_hash("POST", "https://api.example/data", b'{"q": 2}'),
        request_hash("POST", "https://api.example/data", b""),
    }
    assert base not in variants and len(variants) == 4


def test_request_hash_field_boundaries_cannot_be_shifted() -> None:
    # Each part is hashed separately, so moving bytes from the URL into the body changes the hash.
    assert request_hash("GET", "https://a/b", b"c") != request_hash("GET", "https://a/bc", b"")


def test_delivery_hash_is_keccak_of_the_exact_bytes() -> None:
    assert delivery_hash(b"hello") == keccak(b"hello")
    assert delivery_hash(b"hello") != delivery_hash(b"hello\n")


def test_json_round_trip() -> None:
    terms = _terms()
    wire = terms.to_json()
    assert wire["amount"] == "10000" and wire["requestHash"].startswith("0x")
    assert Terms.from_json(wire) == terms
    assert Terms.from_json({**wire, "amount": 10_000, "deadline": str(terms.deadline)}) == terms


def test_addresses_are_normalised_so_equal_terms_hash_alike() -> None:
    terms = _terms()
    lower = Terms.from_json({**terms.to_json(), "buyer": terms.buyer.lower()})
    assert lower == terms and lower.hash() == terms.hash()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"amount": "-1"}, "amount"),
        ({"amount": "1e6"}, "terms.amount must be a uint256 as a decimal string of at most 78 digits, got '1e6'"),
        ({"amount": 1.5}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": str(2**256)}, "amount"),
        ({"deadline": 2**64}, "terms.deadline must be a uint64"),
        ({"deadline": None}, "deadline"),
        ({"buyer": "0x1234"}, "terms.buyer is not an address: '0x1234'"),
        ({"seller": 12}, "seller"),
        ({"requestHash": "0x" + "00" * 31}, "terms.requestHash must be 32 bytes, got 31"),
        ({"salt": "0xzz"}, "terms.salt must be 0x-prefixed hex, got '0xzz'"),
        ({"extra": 1}, "terms.extra is unexpected"),
    ],
)
def test_from_json_rejects_malformed_terms(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=r"terms|amount|deadline") as info:
        Terms.from_json({**_terms().to_json(), **change})
    assert fragment in str(info.value)


def test_from_json_rejects_missing_fields_and_non_objects() -> None:
    wire = _terms().to_json()
    del wire["salt"]
    with pytest.raises(ValueError, match=r"terms\.salt is missing"):
        Terms.from_json(wire)
    bad: object
    for bad in (None, [], "terms", 3):
        with pytest.raises(ValueError, match="JSON object"):
            Terms.from_json(bad)


def test_state_values_match_the_contract_enum() -> None:
    assert [s.value for s in State] == [0, 1, 2, 3]
    assert [s.name for s in State] == ["NONE", "HELD", "RELEASED", "REFUNDED"]
