"""Indexing: bring the store's view of each escrow contract up to the confirmed head, undoing reorgs.

Reorgs are found through the hash chain rather than by re-scanning a window of
blocks every cycle: if the block at the checkpoint still has the hash we stored,
every block below it is unchanged too. Only when it differs does the indexer walk
back through the hashes it stored (one per indexed head and per block with an
escrow event) to the newest block still on the chain, and re-index from there.
A quiet chain therefore costs one `eth_getLogs` per new block (batched with that
block, so a backend behind the head cannot pass for a quiet one) and nothing more,
however much history the store holds.

Logs are read raw: a Deposited log's indexed buyer and seller topics followed by
its data are, word for word, the ABI encoding of the Terms tuple, which is what
`refundMany` takes. The indexer stores those bytes and decodes only the deadline
and the addresses it filters on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from escrow_py.chain.escrow import DELIVERED_TOPIC, DEPOSITED_TOPIC, REFUNDED_TOPIC
from escrow_py.chain.port import EscrowChain
from escrow_py.keeper._config import MAX_LOG_CHUNK
from escrow_py.keeper._store import IndexedEvent, KeeperStore
from escrow_py.protocol.errors import RpcError

log = logging.getLogger("escrow_py.keeper")

_DEPOSITED = "0x" + DEPOSITED_TOPIC.hex()
_DELIVERED = "0x" + DELIVERED_TOPIC.hex()
_REFUNDED = "0x" + REFUNDED_TOPIC.hex()
# How many stored hashes a fork-point search checks before re-indexing from the start block.
FORK_SEARCH_LIMIT = 64


@dataclass(frozen=True, slots=True)
class Head:
    """The latest block, as one cycle sees it."""

    number: int
    hash: str
    timestamp: int
    gas_limit: int


def block_hash(chain: EscrowChain, number: int) -> str | None:
    """The 0x-hex hash of block `number` on the current chain (the form the store keeps); None past the head."""
    found = chain.block_hash(number)
    return None if found is None else "0x" + found.hex()


def read_head(chain: EscrowChain) -> Head:
    head = chain.head()
    return Head(head.number, "0x" + head.hash.hex(), head.timestamp, head.gas_limit)


def parse_log(entry: dict[str, Any]) -> IndexedEvent | None:
    """One escrow event from a raw eth_getLogs entry; None for anything else."""
    topics = entry.get("topics") or []
    if entry.get("removed") or not topics:
        return None
    first = topics[0].lower()
    number, block_hash, tx_hash = int(entry["blockNumber"], 16), entry["blockHash"], entry["transactionHash"]
    if first == _DEPOSITED and len(topics) == 4:
        data = bytes.fromhex(entry["data"][2:])
        if len(data) != 192:
            return None
        buyer, seller = bytes.fromhex(topics[2][2:]), bytes.fromhex(topics[3][2:])
        return IndexedEvent(
            "deposited", topics[1].lower(), number, block_hash, tx_hash,
            encoded=buyer + seller + data,
            deadline=int.from_bytes(data[96:128], "big"),
            buyer="0x" + buyer[12:].hex(), seller="0x" + seller[12:].hex(), token="0x" + data[44:64].hex(),
        )  # fmt: skip
    if first == _DELIVERED and len(topics) == 2:
        return IndexedEvent("released", topics[1].lower(), number, block_hash, tx_hash)
    if first == _REFUNDED and len(topics) == 3:
        return IndexedEvent("refunded", topics[1].lower(), number, block_hash, tx_hash)
    return None


class Indexer:
    """Indexes one escrow contract's events into the store."""

    def __init__(
        self, chain: EscrowChain, store: KeeperStore, escrow: str, start_block: int, on_rpc_error: Callable[[], None]
    ) -> None:
        self.chain = chain
        self.store = store
        self.escrow = escrow
        self.start_block = start_block
        self.on_rpc_error = on_rpc_error

    def sync(self, head: int, hashes: dict[int, str]) -> tuple[int, int | None, bool]:
        """Index up to block `head`; (checkpoint, fork point if a reorg was undone, whether anything changed).

        `hashes` caches canonical block hashes for this cycle (shared with the attempt tracker).
        """
        checkpoint = self.store.checkpoint(self.escrow)
        fork: int | None = None
        if checkpoint is None:
            rewind = self.start_block - 1
        else:
            rewind = checkpoint
            stored = self.store.block_hash(checkpoint)
            if stored is not None and self._canonical(checkpoint, hashes) != stored:
                rewind = fork = self._fork_point(checkpoint, hashes)
                log.warning("reorg: block %d changed; re-indexing %s from block %d", checkpoint, self.escrow, fork + 1)
        if head <= rewind and fork is None:
            return checkpoint if checkpoint is not None else rewind, None, False
        top = max(head, rewind)
        # Read before the logs: if a reorg lands in between, the stored hash is the stale one and the
        # next cycle notices; read after, it would vouch for logs of the old chain.
        head_hash = self._canonical(top, hashes)
        events = self._fetch(rewind + 1, head) if head > rewind else []
        block_hashes = {e.block_number: e.block_hash for e in events}
        if head_hash is not None:
            block_hashes[top] = head_hash
        changed = self.store.apply(self.escrow, rewind_to=rewind, events=events, checkpoint=top,
                                   block_hashes=sorted(block_hashes.items()), read_checkpoint=checkpoint)  # fmt: skip
        if changed is None:  # another keeper indexed meanwhile: its checkpoint stands, the next cycle goes on from it
            moved = self.store.checkpoint(self.escrow)
            return (rewind if moved is None else moved), None, False
        return top, fork, changed

    def _canonical(self, number: int, hashes: dict[int, str]) -> str | None:
        if number not in hashes:
            found = block_hash(self.chain, number)
            if found is None:
                return None
            hashes[number] = found
        return hashes[number]

    def _fork_point(self, checkpoint: int, hashes: dict[int, str]) -> int:
        """The newest stored block still on the chain (its events stand); the start block's parent if none is."""
        for number, stored in self.store.block_hashes_below(checkpoint, FORK_SEARCH_LIMIT):
            if number < self.start_block:
                break
            if self._canonical(number, hashes) == stored:
                return number
        return self.start_block - 1

    def _fetch(self, first: int, last: int) -> list[IndexedEvent]:
        """eth_getLogs in chunks of at most MAX_LOG_CHUNK blocks, halving the chunk on provider errors."""
        events: list[IndexedEvent] = []
        topics = [[_DEPOSITED, _DELIVERED, _REFUNDED]]
        chunk = MAX_LOG_CHUNK
        block = first
        while block <= last:
            end = min(last, block + chunk - 1)
            query = {"address": self.escrow, "fromBlock": hex(block), "toBlock": hex(end), "topics": topics}
            # With the range's last block in the same batch: a backend behind the head answers eth_getLogs for
            # blocks it has not seen with [] and no error, which would index them as empty for good.
            logs, last_block = self.chain.requests(
                [("eth_getLogs", [query]), ("eth_getBlockByNumber", [hex(end), False])]
            )
            failed = next((a for a in (logs, last_block) if isinstance(a, BaseException)), None)
            if failed is not None:
                self.on_rpc_error()
                if chunk == 1:
                    raise RpcError(f"eth_getLogs failed for block {block}: {failed}") from failed
                chunk = max(1, chunk // 2)
                continue
            if last_block is None:
                self.on_rpc_error()
                raise RpcError(
                    f"the node answering eth_getLogs for blocks {block}-{end} has not seen block {end} (a backend "
                    "behind the head): not indexed until it has"
                )
            if not isinstance(logs, list):
                raise RpcError(f"eth_getLogs returned {type(logs).__name__}, not a list")
            events.extend(e for entry in logs if (e := parse_log(entry)) is not None)
            block = end + 1
        return events
