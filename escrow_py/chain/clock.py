"""The chain's clock as a transaction sent now will meet it.

The contract and the token judge every time limit by `block.timestamp` of the block that
includes the transaction, not of the latest block. On a chain that mines only when there
is a transaction (anvil's automine, a quiet devnet) the latest block can be minutes old,
and a window counted from it is already spent when the next block is stamped with the
current time. The node knows what that stamp will be: it is the `pending` block's.

Every time the package reads from the chain comes from here: `next_block_time` (the clock
deadlines and windows are judged by; `next_block` also gives the base fee that block charges,
read in the same call) and `block_time` (when a mined block was judged).
"""

from __future__ import annotations

from web3 import Web3

from escrow_py.chain import rpc


def next_block_time(w3: Web3) -> int:
    """The timestamp the next block will carry, as the node sees it now (next_block's first value)."""
    return next_block(w3)[0]


def next_block(w3: Web3) -> tuple[int, int | None]:
    """(timestamp, base fee) of the next block, as the node sees it now; the base fee None if not told.

    The `pending` block's: anvil, geth and their kin build that block on top of the latest one,
    stamped with the time the next block would get, so it is never earlier than the latest
    block's, and priced with the base fee a transaction sent now pays. A node that has no pending
    block (some providers answer null, or an error) gives the latest block's instead, which on a
    chain that mines every few seconds is as good. Raises RpcError when the node cannot be reached.
    """
    try:
        pending = rpc.send(w3, NEXT_BLOCK_TIME)
    except rpc.NodeError:
        pending = None
    return next_block_from(w3, pending)


# next_block's request, to batch with others; `next_block_from` / `next_block_time_from` read its result.
NEXT_BLOCK_TIME = rpc.Request("eth_getBlockByNumber", ["pending", False])


def next_block_time_from(w3: Web3, pending: object) -> int:
    """The next block's time from the answer to NEXT_BLOCK_TIME (next_block_from's first value)."""
    return next_block_from(w3, pending)[0]


def next_block_from(w3: Web3, pending: object) -> tuple[int, int | None]:
    """next_block from the answer to NEXT_BLOCK_TIME (a value or the NodeError it met); a node without a
    pending block is asked for the latest block's. Other failures are raised as they were."""
    if isinstance(pending, BaseException) and not isinstance(pending, rpc.NodeError):
        raise pending
    block = pending if isinstance(pending, dict) and pending.get("timestamp") is not None else None
    if block is None:
        block = rpc.request(w3, "eth_getBlockByNumber", ["latest", False])
    base_fee = block.get("baseFeePerGas") if isinstance(block, dict) else None
    return _timestamp(block), None if base_fee is None else int(str(base_fee), 16)


def block_time(w3: Web3, block: int | str = "latest") -> int:
    """The timestamp of a mined block (a number, or "latest"): when the transactions in it were judged."""
    tag = hex(block) if isinstance(block, int) else block
    return _timestamp(rpc.request(w3, "eth_getBlockByNumber", [tag, False]))


def _timestamp(block: object) -> int:
    if not isinstance(block, dict):
        raise rpc.NodeError("eth_getBlockByNumber", {"message": f"no block in the answer: {block!r}"})
    return int(str(block["timestamp"]), 16)
