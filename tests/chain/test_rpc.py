"""The plain JSON-RPC read path: results, decoded reverts, and node or transport failures as RpcError."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from fixtures.chain import SELLER, STRANGER, Chain
from helpers import address, deposit, make_terms, sign_deposit
from rpc_proxy import RpcProxy
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

from escrow_devtools.anvil import LocalNodeProvider, free_port
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


def _reads(chain: Chain, escrow_id: bytes, holder: str, data: bytes) -> list[rpc.Request]:
    return [
        chain.escrow.state_request(escrow_id),
        chain.token.balance_request(holder),
        chain.token.authorization_state_request(holder, escrow_id),
        chain.sender(SELLER).estimate_gas_request(chain.escrow.address, data),
        rpc.Request("eth_noSuchMethod", []),
    ]


def _check_answers(chain: Chain, answers: list[object], escrow_id: bytes, holder: str) -> None:
    state, balance, used, gas, unknown = answers
    assert chain.escrow.state_from(state) is State.HELD
    assert chain.token.balance_from(balance) == chain.token.balance_of(holder)
    assert chain.token.authorization_state_from(used) is True
    # A failed item is its own error (here a revert, decoded as estimate_gas decodes it); the others still answer.
    with pytest.raises(ContractRevert) as reverted:
        chain.sender(SELLER).gas_from(gas)
    assert reverted.value.name == "AlreadyDeposited"
    assert isinstance(unknown, rpc.NodeError) and "eth_noSuchMethod failed" in str(unknown)


def test_a_batch_answers_each_read_as_it_would_alone_in_one_round_trip(chain: Chain) -> None:
    terms = make_terms(chain)
    deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    auth, signature = sign_deposit(chain, terms)
    again = chain.escrow.deposit_data(terms, auth, signature)  # a second deposit of the same id reverts
    with RpcProxy(chain.node.url) as proxy:
        w3 = rpc.connect(proxy.url)
        answers = rpc.batch(w3, _reads(chain, escrow_id, terms.buyer, again))
        assert proxy.requests == ["batch"]  # one HTTP request for the five
        assert sum(proxy.calls.values()) == 5
        _check_answers(chain, answers, escrow_id, terms.buyer)
        # A provider that takes no batches gets them one by one, with the same answers.
        proxy.refuse_batches = True
        answers = rpc.batch(w3, _reads(chain, escrow_id, terms.buyer, again))
        assert proxy.requests[1:2] == ["batch"] and len(proxy.requests) == 2 + 5
        _check_answers(chain, answers, escrow_id, terms.buyer)


def test_a_batch_to_a_dead_node_gives_each_read_the_rpc_error(chain: Chain) -> None:
    dead = rpc.connect(f"http://127.0.0.1:{free_port()}", deadline=2)
    answers = rpc.batch(dead, [chain.escrow.state_request(b"\x00" * 32), rpc.Request("eth_blockNumber", [])])
    assert len(answers) == 2
    assert all(isinstance(a, RpcError) and "unreachable" in str(a) for a in answers)


def test_a_plain_http_provider_batches_in_one_round_trip_too(chain: Chain) -> None:
    """The tools' and tests' own Web3 (web3's HTTPProvider, not the roles' DeadlineHTTPProvider) batches too: a
    TxSender on it reads the fees and its nonce in one request, not three. Its transport failures are RpcErrors."""
    terms = make_terms(chain)
    deposit(chain, terms)
    escrow_id = chain.escrow.id_of(terms)
    auth, signature = sign_deposit(chain, terms)
    again = chain.escrow.deposit_data(terms, auth, signature)
    with RpcProxy(chain.node.url) as proxy:
        plain = Web3(HTTPProvider(proxy.url))
        answers = rpc.batch(plain, _reads(chain, escrow_id, terms.buyer, again))
        assert proxy.requests == ["batch"] and sum(proxy.calls.values()) == 5
        _check_answers(chain, answers, escrow_id, terms.buyer)
        proxy.refuse_batches = True
        answers = rpc.batch(plain, _reads(chain, escrow_id, terms.buyer, again))
        assert proxy.requests[1:2] == ["batch"] and len(proxy.requests) == 2 + 5
        _check_answers(chain, answers, escrow_id, terms.buyer)
    dead = Web3(HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    answers = rpc.batch(dead, [chain.escrow.state_request(b"\x00" * 32), rpc.Request("eth_blockNumber", [])])
    assert len(answers) == 2
    assert all(isinstance(a, RpcError) and "unreachable" in str(a) for a in answers)


def test_the_tools_local_provider_answers_as_web3s_own_and_fails_as_it_does(chain: Chain) -> None:
    """Anvil.web3()'s LocalNodeProvider: web3's answers over kept-alive connections shared by threads, batches in
    the order asked, and a dead node's failure as web3's HTTPProvider raises it (requests' ConnectionError)."""
    w3, plain = chain.w3, Web3(HTTPProvider(chain.node.url))
    assert isinstance(w3.provider, LocalNodeProvider)
    assert w3.eth.get_block("latest") == plain.eth.get_block("latest")
    with ThreadPoolExecutor(8) as pool:
        heads = set(pool.map(lambda _: int(w3.eth.block_number), range(200)))
    assert heads == {int(plain.eth.block_number)}
    asked: list[tuple[RPCEndpoint, Any]] = [
        (RPCEndpoint(method), []) for method in ("eth_chainId", "eth_blockNumber", "eth_noSuchMethod")
    ]
    answers = w3.provider.make_batch_request(asked)
    assert isinstance(answers, list)
    assert [a.get("result") for a in answers[:2]] == [hex(w3.eth.chain_id), hex(plain.eth.block_number)]
    assert "error" in answers[2]
    dead = Web3(LocalNodeProvider(f"http://127.0.0.1:{free_port()}", timeout=2))
    with pytest.raises(requests.exceptions.ConnectionError):
        dead.eth.get_block("latest")
    with pytest.raises(RpcError, match="eth_call failed"):
        rpc.call(dead, chain.escrow.address, b"")
