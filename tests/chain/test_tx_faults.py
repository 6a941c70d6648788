"""TxSender and the RPC connection under the faults a real node produces: reorgs, gaps, shared keys, hangs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fixtures.chain import OPERATOR, STRANGER, Chain
from helpers import address, dev
from rpc_proxy import RpcProxy
from web3 import Web3
from web3.types import RPCEndpoint

from escrow_py.chain import rpc
from escrow_py.chain.clock import block_time
from escrow_py.chain.tx import TxSender
from escrow_py.protocol.errors import InsufficientFunds, NonceConflict, RpcError, RpcTimeout

TRANSFER_GAS = 21_000


def _rpc(chain: Chain, method: str, params: list[Any]) -> Any:
    answer = chain.w3.provider.make_request(RPCEndpoint(method), params)
    assert "error" not in answer, answer
    return answer.get("result")


def test_watch_reports_a_transaction_a_reorg_dropped_and_resynchronises_the_nonce(chain: Chain) -> None:
    sender = TxSender(chain.w3, dev(OPERATOR), watch=True)
    kept = sender.send(address(STRANGER), b"", gas=TRANSFER_GAS)
    sender.wait(kept.tx_hash)
    chain.mine()
    dropped = sender.send(address(STRANGER), b"", gas=TRANSFER_GAS)
    sender.wait(dropped.tx_hash)
    assert sender.watch(depth=10).dropped == []
    _rpc(chain, "anvil_reorg", [1, []])
    report = sender.watch(depth=2)
    assert [s.tx_hash for s in report.dropped] == [dropped.tx_hash]
    assert report.final == [kept.tx_hash]  # two blocks deep and still on chain
    assert report.following == 0
    again = sender.send(address(STRANGER), b"", gas=TRANSFER_GAS)
    assert again.nonce == dropped.nonce, "the next transaction must fill the nonce the reorg freed"
    assert sender.wait(again.tx_hash, timeout=10)["status"] == 1


def test_confirm_re_signs_a_transaction_stuck_behind_a_nonce_gap(chain: Chain) -> None:
    sender = TxSender(chain.w3, dev(OPERATOR))  # not watching: nothing resynchronises it before
    first = sender.send(address(STRANGER), b"", gas=TRANSFER_GAS)
    sender.wait(first.tx_hash)
    _rpc(chain, "anvil_reorg", [1, []])  # `first` is gone; the sender's cached nonce is one too high
    after = int(chain.w3.eth.block_number)
    began = time.monotonic()
    receipt = sender.transact(address(STRANGER), b"", gas=TRANSFER_GAS, timeout=30, reprice_after=0.5)
    assert time.monotonic() - began < 20
    assert chain.w3.eth.get_transaction(receipt["transactionHash"])["nonce"] == first.nonce + 1
    # The gap was filled by an empty transfer to the key itself: the call itself ran once.
    mined: list[Any] = [
        tx
        for n in range(after + 1, int(chain.w3.eth.block_number) + 1)
        for tx in chain.w3.eth.get_block(n, full_transactions=True)["transactions"]
    ]
    assert [(tx["nonce"], tx["to"]) for tx in mined] == [
        (first.nonce, address(OPERATOR)),
        (first.nonce + 1, address(STRANGER)),
    ]


def test_a_key_used_elsewhere_is_followed_and_a_refused_nonce_is_retried_once(chain: Chain) -> None:
    sender = TxSender(chain.w3, dev(OPERATOR))
    sender.transact(address(STRANGER), b"", gas=TRANSFER_GAS)
    TxSender(chain.w3, dev(OPERATOR)).transact(address(STRANGER), b"", gas=TRANSFER_GAS)  # behind its back
    assert sender.transact(address(STRANGER), b"", gas=TRANSFER_GAS)["status"] == 1
    proxy = RpcProxy(chain.node.url)
    try:
        behind = TxSender(rpc.connect(proxy.url), dev(OPERATOR))
        proxy.fail("eth_sendRawTransaction", {"code": -32003, "message": "nonce too low"}, times=1)
        assert behind.transact(address(STRANGER), b"", gas=TRANSFER_GAS)["status"] == 1
        proxy.fail("eth_sendRawTransaction", {"code": -32003, "message": "nonce too low"}, times=2)
        with pytest.raises(NonceConflict):
            behind.send(address(STRANGER), b"", gas=TRANSFER_GAS)
    finally:
        proxy.close()


def test_a_key_without_gas_money_raises_insufficient_funds(chain: Chain) -> None:
    _rpc(chain, "anvil_setBalance", [address(OPERATOR), "0x0"])
    with pytest.raises(InsufficientFunds) as info:
        TxSender(chain.w3, dev(OPERATOR)).send(address(STRANGER), b"", gas=TRANSFER_GAS)
    assert info.value.address == address(OPERATOR)


def _answers(w3: Web3) -> bool:
    """The node answers through `w3` within its 1 s deadline, tried for 30 s: on a loaded machine one
    round trip through the proxy can take longer than the deadline, which is then doing its job."""
    give_up = time.monotonic() + 30
    while True:
        try:
            return int(w3.eth.block_number) >= 0
        except RpcTimeout:
            if time.monotonic() > give_up:
                raise


def test_every_call_has_one_total_deadline_retries_included(chain: Chain) -> None:
    proxy = RpcProxy(chain.node.url)
    try:
        w3 = rpc.connect(proxy.url + "/v2/SECRET", deadline=1.0)
        assert _answers(w3)
        proxy.mode = "blackhole"
        calls: tuple[Callable[[], int], ...] = (lambda: w3.eth.block_number, lambda: block_time(w3))
        for call in calls:
            began = time.monotonic()
            with pytest.raises(RpcError) as info:
                call()
            assert time.monotonic() - began < 3.0
            assert "SECRET" not in str(info.value)
        with pytest.raises(RpcTimeout):
            w3.eth.get_balance(address(STRANGER))
        proxy.mode = "forward"
        assert _answers(w3)  # recovers once the node answers
    finally:
        proxy.close()
    with pytest.raises(RpcError, match="unreachable"):
        _ = rpc.connect("http://127.0.0.1:9", deadline=1.0).eth.block_number
