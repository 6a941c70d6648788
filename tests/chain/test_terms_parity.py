"""The Python derivations in escrow_py.protocol.terms equal the contract's own, over random terms."""

from __future__ import annotations

from fixtures.chain import Chain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow_py.protocol.codec import UINT64_MAX, UINT256_MAX
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, TERMS_TYPEHASH, Terms

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
terms_strategy = st.builds(
    Terms,
    buyer=addresses,
    seller=addresses,
    operator=addresses,
    token=addresses,
    amount=st.integers(min_value=0, max_value=UINT256_MAX),
    deadline=st.integers(min_value=0, max_value=UINT64_MAX),
    request_hash=st.binary(min_size=32, max_size=32),
    salt=st.binary(min_size=32, max_size=32),
)


def test_typehash_matches_the_contract(chain: Chain) -> None:
    assert bytes(chain.escrow.contract.functions.TERMS_TYPEHASH().call()) == TERMS_TYPEHASH


def test_max_deadline_window_matches_the_contract(chain: Chain) -> None:
    assert chain.escrow.contract.functions.MAX_DEADLINE_WINDOW().call() == MAX_DEADLINE_WINDOW


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(terms=terms_strategy)
def test_terms_hash_and_escrow_id_match_the_contract(chain: Chain, terms: Terms) -> None:
    # Pure reads: no state to roll back between examples.
    assert chain.escrow.onchain_terms_hash(terms) == terms.hash()
    assert chain.escrow.onchain_escrow_id(terms) == terms.escrow_id(chain.escrow.chain_id, chain.escrow.address)
    assert chain.escrow.id_of(terms) == terms.escrow_id(84532, chain.escrow.address)
