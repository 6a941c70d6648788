"""A transaction hash in a facilitator's answer is read as untrusted input."""

from __future__ import annotations

import pytest

from escrow_py.seller._remote import tx_hash_of

HASH = "0x" + "ab" * 32


def test_a_well_formed_hash_is_read() -> None:
    assert tx_hash_of(HASH) == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize("garbled", [None, "", "0x", "ab" * 32, "0x" + "zz" * 32, "0x" + "ab" * 31, HASH + "00", 7])
def test_anything_else_is_no_transaction_not_a_crash(garbled: object) -> None:
    # Before: bytes.fromhex on the answer raised ValueError for "0xzz..." inside the outbox and the paid request.
    assert tx_hash_of(garbled) is None
