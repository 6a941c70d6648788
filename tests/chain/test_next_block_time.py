"""escrow_py.chain.clock.next_block_time: the stamp the next block will carry, on a real anvil."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures.chain import Chain
from helpers import BUYER, STRANGER, address
from web3 import HTTPProvider, Web3

from escrow_py.chain.clock import next_block_time
from escrow_py.protocol.errors import RpcError


def _mine_a_transaction(chain: Chain) -> int:
    receipt = chain.token.transfer(chain.sender(BUYER), address(STRANGER), 1)
    return int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def test_after_an_idle_spell_it_is_the_next_blocks_stamp_not_the_latest(chain: Chain) -> None:
    chain.mine()
    latest = chain.now()
    chain.w3.provider.make_request("evm_increaseTime", [300])  # type: ignore[arg-type]
    predicted = next_block_time(chain.w3)
    assert predicted >= latest + 300
    mined = _mine_a_transaction(chain)
    assert predicted <= mined <= predicted + 5  # the seconds between the read and the block


def test_a_stamp_set_for_the_next_block_is_the_one_predicted(chain: Chain) -> None:
    target = chain.now() + 1000
    chain.set_next_timestamp(target)
    assert next_block_time(chain.w3) == target
    assert _mine_a_transaction(chain) == target


class NoPendingBlock(HTTPProvider):
    """anvil behind a provider that has no pending block (some public RPCs answer null for it)."""

    def make_request(self, method: Any, params: Any) -> Any:
        if method == "eth_getBlockByNumber" and params and params[0] == "pending":
            return {"jsonrpc": "2.0", "id": 1, "result": None}
        return super().make_request(method, params)


def test_without_a_pending_block_it_is_the_latest_blocks(chain: Chain) -> None:
    chain.mine()
    chain.w3.provider.make_request("evm_increaseTime", [300])  # type: ignore[arg-type]
    assert next_block_time(Web3(NoPendingBlock(chain.node.url))) == chain.now()


def test_an_unreachable_node_is_a_typed_error() -> None:
    with pytest.raises(RpcError, match="eth_getBlockByNumber failed"):
        next_block_time(Web3(HTTPProvider("ftp://127.0.0.1:1")))
