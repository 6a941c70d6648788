"""The plain JSON-RPC read path: results, decoded reverts, and node or transport failures as RpcError."""

from __future__ import annotations

import os

import pytest
from fixtures.chain import SELLER, STRANGER, Chain
from helpers import address, deposit, make_terms
from web3 import HTTPProvider, Web3

from escrow_devtools.anvil import free_port
from escrow_py.chain import rpc
from escrow_py.chain.clock import block_time
from escrow_py.protocol.errors import ContractRevert, RpcError
from escrow_py.protocol.terms import State


def test_reads_match_what_web3_reads(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    assert chain.escrow.state_of(escrow_id) is State.HELD
    assert State(chain.escrow.contract.functions.stateOf(escrow_id).call()) is State.HELD
    holder = terms.buyer
    assert chain.token.balance_of(holder) == chain.token.contract.functions.balanceOf(holder).call()
    assert chain.token.authorization_state(holder, escrow_id) is True
    assert chain.token.authorization_state(holder, os.urandom(32)) is False
    assert block_time(chain.w3) == chain.w3.eth.get_block("latest")["timestamp"]
    block = int(chain.w3.eth.block_number) - 1  # before the deposit: historical reads take a block number
    assert chain.escrow.state_of(escrow_id, block) is State.NONE


def test_a_revert_is_decoded_with_its_values(chain: Chain) -> None:
    terms = make_terms(chain)
    with pytest.raises(ContractRevert) as estimated:
        chain.sender(SELLER).estimate_gas(chain.escrow.address, chain.escrow.deliver_data(terms, b"\x01" * 32))
    assert estimated.value.name == "NotHeld"
    deposit(chain, terms)
    with pytest.raises(ContractRevert) as caught:
        chain.sender(STRANGER).call(chain.escrow.address, chain.escrow.deliver_data(terms, b"\x01" * 32))
    assert caught.value.name == "NotSellerOrOperator"
    assert caught.value.args_by_name["caller"] == address(STRANGER)


def test_node_errors_and_dead_nodes_are_rpc_errors(chain: Chain) -> None:
    with pytest.raises(RpcError, match="eth_noSuchMethod failed"):
        rpc.request(chain.w3, "eth_noSuchMethod", [])
    dead = Web3(HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    with pytest.raises(RpcError, match="eth_call failed"):
        rpc.call(dead, chain.escrow.address, b"")
