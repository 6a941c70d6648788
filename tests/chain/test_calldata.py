"""The escrow's calldata, encoded by eth_abi from the ABI's selectors and types, is byte for byte what web3's
contract encoder makes of the same call, for every call this package sends, over random terms."""

from __future__ import annotations

from typing import Any

from hexbytes import HexBytes
from hypothesis import given, settings
from hypothesis import strategies as st
from web3 import Web3

from escrow_py.chain.escrow import Escrow, Settlement
from escrow_py.protocol.codec import UINT256_MAX
from escrow_py.protocol.eip3009 import Authorization
from escrow_py.protocol.terms import Terms

from .test_terms_parity import terms_strategy

ESCROW = Escrow(Web3(), "0x" + "ab" * 20)  # encoding reads nothing from a node

words = st.binary(min_size=32, max_size=32)
uint256 = st.integers(min_value=0, max_value=UINT256_MAX)
signatures = st.binary(min_size=0, max_size=130)


def _web3(fn: str, *args: Any) -> bytes:
    return bytes(HexBytes(ESCROW.contract.encode_abi(fn, args=list(args))))


def _settlement(terms: Terms, valid_after: int, valid_before: int, signature: bytes, delivered: bytes) -> Settlement:
    auth = Authorization(
        from_=terms.buyer, to=ESCROW.address, value=terms.amount, valid_after=valid_after, valid_before=valid_before,
        nonce=terms.escrow_id(84532, ESCROW.address),
    )  # fmt: skip
    return Settlement(terms, auth, signature, delivered)


@settings(max_examples=40, deadline=None)
@given(
    terms=st.lists(terms_strategy, min_size=1, max_size=3),
    valid=st.tuples(uint256, uint256),
    signature=signatures,
    delivered=words,
)
def test_every_call_encodes_as_web3_encodes_it(
    terms: list[Terms], valid: tuple[int, int], signature: bytes, delivered: bytes
) -> None:
    first = terms[0]
    settlements = [_settlement(t, *valid, signature, delivered) for t in terms]
    auth = settlements[0].authorization
    assert ESCROW.deposit_data(first, auth, signature) == _web3(
        "deposit", first.as_tuple(), valid[0], valid[1], signature
    )
    assert ESCROW.settle_data(settlements[0]) == _web3(
        "settle", first.as_tuple(), valid[0], valid[1], signature, delivered
    )
    assert ESCROW.deliver_data(first, delivered) == _web3("deliver", first.as_tuple(), delivered)
    assert ESCROW.refund_data(first) == _web3("refund", first.as_tuple())
    pairs = [(t, delivered) for t in terms]
    ordered = sorted(pairs, key=lambda e: (e[0].token, e[0].seller))
    assert ESCROW.deliver_many_data(pairs) == _web3(
        "deliverMany", [t.as_tuple() for t, _ in ordered], [h for _, h in ordered]
    )
    by_buyer = sorted(terms, key=lambda t: (t.token, t.buyer))
    assert ESCROW.refund_many_data(terms) == _web3("refundMany", [t.as_tuple() for t in by_buyer])
    assert ESCROW.settle_many_data(settlements) == _web3(
        "settleMany", [s.as_tuple() for s in ESCROW.order_for_payout(settlements)]
    )
