"""Finding blocks by time, and reading logs over long ranges in chunks a public RPC accepts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from web3 import Web3

from escrow_py.chain.clock import block_time

# Public RPCs (Base's included) refuse eth_getLogs over wide ranges; 2,000 blocks passes everywhere we know.
LOG_CHUNK = 2_000

_T = TypeVar("_T")


def first_block_at(w3: Web3, timestamp: int, *, latest: int | None = None) -> int:
    """The first block whose timestamp is >= `timestamp` (`latest + 1` if there is none yet).

    A binary search over block headers: about log2(height) eth_getBlockByNumber calls.
    """
    hi = int(w3.eth.block_number) if latest is None else latest
    if block_time(w3, hi) < timestamp:
        return hi + 1
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if block_time(w3, mid) < timestamp:
            lo = mid + 1
        else:
            hi = mid
    return lo


def chunks(first: int, last: int, size: int = LOG_CHUNK) -> Iterator[tuple[int, int]]:
    """[first, last] as consecutive inclusive ranges of at most `size` blocks."""
    start = first
    while start <= last:
        end = min(last, start + size - 1)
        yield start, end
        start = end + 1


def find_in_chunks(fetch: Callable[[int, int], _T | None], first: int, last: int, size: int = LOG_CHUNK) -> _T | None:
    """The first non-None `fetch(start, end)` over [first, last] in chunks; None if every chunk had nothing."""
    for start, end in chunks(first, last, size):
        if (found := fetch(start, end)) is not None:
            return found
    return None
