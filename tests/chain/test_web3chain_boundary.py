"""Web3EscrowChain is where web3's, requests' and the socket layer's exceptions end.

Every method of the port, asked through a node that fails in each way a node fails (an error
object for every call, HTTP 502, connections closed unanswered, nothing listening), raises the
package's ChainError family and nothing else: no Web3RPCError, no requests ConnectionError, no
bare ValueError. That is what lets the roles catch ChainError alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from fixtures.chain import OPERATOR, Chain
from helpers import BUYER, SELLER, address, dev
from rpc_proxy import RpcProxy

from escrow_py.chain.escrow import Settlement
from escrow_py.chain.web3chain import Web3EscrowChain, connect_chain
from escrow_py.protocol.eip3009 import TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.errors import ChainError
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import EscrowPayload


def _calls(chain: Web3EscrowChain, real: Chain) -> dict[str, Callable[[], Any]]:
    token = real.token.address
    terms = Terms(
        buyer=address(BUYER),
        seller=address(SELLER),
        operator=address(OPERATOR),
        token=token,
        amount=1_000,
        deadline=real.now() + 300,
        request_hash=os.urandom(32),
        salt=os.urandom(32),
    )
    auth = authorization_for(terms, real.escrow.address, 84532, 0, terms.deadline)
    signature = sign_authorization(
        dev(BUYER), TokenDomain(name="USDC", version="2", chain_id=84532, verifying_contract=token), auth
    )
    payload = EscrowPayload(authorization=auth, signature=signature, terms=terms)
    settlement = Settlement(terms, auth, signature, b"\x01" * 32)
    tx = os.urandom(32)
    return {
        "chain_id": lambda: chain.chain_id,
        "next_block_time": chain.next_block_time,
        "block_time": lambda: chain.block_time("latest"),
        "head": chain.head,
        "block_hash": lambda: chain.block_hash(1),
        "state_of": lambda: chain.state_of(os.urandom(32)),
        "balance_of": lambda: chain.balance_of(token, address(BUYER)),
        "authorization_used": lambda: chain.authorization_used(token, address(BUYER), os.urandom(32)),
        "token_domain": lambda: chain.token_domain(token),
        "check_escrow": lambda: chain.check_escrow(real.escrow.address),
        "code_at": lambda: chain.code_at(token),
        "gas_balance": chain.gas_balance,
        "fees": chain.fees,
        "simulate_deposit": lambda: chain.simulate_deposit(payload),
        "simulate_settle": lambda: chain.simulate_settle(settlement),
        "look": lambda: chain.look(os.urandom(32), settlement),
        "balance_and_next_block_time": lambda: chain.balance_and_next_block_time(token, address(BUYER)),
        "call": lambda: chain.call(token, b"\x00\x00\x00\x00"),
        "deposit": lambda: chain.deposit(payload),
        "resume": lambda: chain.resume(tx),
        "refund": lambda: chain.refund(terms),
        "deliver_many": lambda: chain.deliver_many([(terms, b"\x01" * 32)]),
        "settle_many": lambda: chain.settle_many([settlement]),
        "sign": lambda: chain.sign(real.escrow.address, b""),
        "request": lambda: chain.request("eth_blockNumber", []),
        "receipt": lambda: chain.receipt(tx),
        "delivered_hash": lambda: chain.delivered_hash(os.urandom(32), tx_hash=tx),
        "settlement_of": lambda: chain.settlement_of(os.urandom(32)),
    }


def _break(proxy: RpcProxy, fault: str) -> None:
    if fault == "error objects":
        proxy.answer_errors()
    elif fault == "http 502":
        proxy.http_error_rate = 1.0
    elif fault == "dropped connections":
        proxy.drop_rate = 1.0
    else:
        proxy.stop()


@pytest.mark.parametrize("fault", ["error objects", "http 502", "dropped connections", "gone"])
def test_every_port_method_raises_only_chain_errors_whatever_the_node_does(chain: Chain, fault: str) -> None:
    with RpcProxy(chain.node.url) as proxy:
        port = connect_chain(proxy.url, deadline=2.0, escrow=chain.escrow.address, signer=dev(OPERATOR), tx_timeout=2)
        calls = _calls(port, chain)
        _break(proxy, fault)
        leaked: dict[str, str] = {}
        for name, call in calls.items():
            try:
                call()
            except ChainError:
                continue
            except Exception as exc:
                leaked[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
            else:
                leaked[name] = "answered as if the node were fine"
    assert leaked == {}
