"""X402Escrow.termsHash / escrowId / TERMS_TYPEHASH: the contract's own derivations.

The Python mirror is checked against these over random terms in tests/chain/test_terms_parity.py.
"""

from __future__ import annotations

import pytest
from eth_abi.abi import encode
from fixtures.chain import BUYER, STRANGER, Chain
from helpers import address, deposit, make_terms

from escrow_py.chain.escrow import Escrow, deploy_escrow
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.terms import TERMS_TYPEHASH, State, Terms


def test_typehash_and_window_constants(chain: Chain) -> None:
    functions = chain.escrow.contract.functions
    assert bytes(functions.TERMS_TYPEHASH().call()) == TERMS_TYPEHASH
    assert functions.MAX_DEADLINE_WINDOW().call() == 30 * 24 * 3600


def test_every_field_changes_the_hash(chain: Chain) -> None:
    terms = make_terms(chain)
    variants = [
        terms.with_(buyer=address(STRANGER)),
        terms.with_(seller=address(STRANGER)),
        terms.with_(operator=address(STRANGER)),
        terms.with_(token=address(STRANGER)),
        terms.with_(amount=terms.amount + 1),
        terms.with_(deadline=terms.deadline + 1),
        terms.with_(request_hash=bytes(32)),
        terms.with_(salt=bytes(32)),
    ]
    hashes = {chain.escrow.onchain_terms_hash(t) for t in [terms, *variants]}
    assert len(hashes) == 9
    assert chain.escrow.onchain_terms_hash(terms) == terms.hash()


def test_id_is_bound_to_this_escrow_and_chain(chain: Chain) -> None:
    terms = make_terms(chain)
    other = Escrow(chain.w3, deploy_escrow(chain.deployer, salt=b"\x01" * 32))  # the same code elsewhere
    assert other.address != chain.escrow.address
    assert chain.escrow.onchain_terms_hash(terms) == other.onchain_terms_hash(terms)
    assert chain.escrow.onchain_escrow_id(terms) != other.onchain_escrow_id(terms)
    assert other.onchain_escrow_id(terms) == terms.escrow_id(84532, other.address)
    assert terms.escrow_id(8453, chain.escrow.address) != terms.escrow_id(84532, chain.escrow.address)


def test_the_id_is_the_nonce_the_token_consumes(chain: Chain) -> None:
    terms = make_terms(chain, buyer=BUYER)
    escrow_id = chain.escrow.onchain_escrow_id(terms)
    assert not chain.token.authorization_state(terms.buyer, escrow_id)
    deposit(chain, terms)
    assert chain.token.authorization_state(terms.buyer, escrow_id)
    assert chain.escrow.state_of(escrow_id) is State.HELD


TERMS_ABI = "(address,address,address,address,uint256,uint64,bytes32,bytes32)"


@pytest.mark.parametrize("word", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("function", ["termsHash", "escrowId", "refund", "deposit"])
def test_dirty_high_bits_are_rejected_with_a_named_error(chain: Chain, word: int, function: str) -> None:
    """An address or deadline word with dirty high bits would hash differently from its ABI value.

    Every entry point checks the terms before reading a field, so the error names the word.
    """
    terms: Terms = make_terms(chain)
    deposit(chain, terms)
    words = bytearray(encode([TERMS_ABI], [terms.as_tuple()]))
    words[word * 32] = 0x01  # the top byte of the word: outside 160 or 64 bits
    rest: list[object] = [0, terms.deadline, b"\x01" * 65] if function == "deposit" else []
    clean = bytes.fromhex(chain.escrow.contract.encode_abi(function, args=[terms.as_tuple(), *rest])[2:])
    dirty = clean[:4] + bytes(words) + clean[4 + len(words) :]
    with pytest.raises(ContractRevert) as caught:
        chain.sender(STRANGER).call(chain.escrow.address, dirty)
    assert caught.value.name == "MalformedTerms" and caught.value.args_by_name == {"field": word}
    if function == "termsHash":
        assert chain.sender(STRANGER).call(chain.escrow.address, clean) == terms.hash()
