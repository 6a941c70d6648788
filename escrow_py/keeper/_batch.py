"""Refund batches: their calldata, their size limits, and how a batch that reverted is split.

Calldata is built from the terms' ABI encodings kept by the indexer: the head of a
`refundMany(Terms[])` call (selector, array offset, length) comes from eth_abi,
and the entries are the stored 256-byte words, so encoding 250 entries is a join,
not a pass through web3's contract encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_abi.abi import encode
from eth_utils.crypto import keccak

from escrow_py.chain.escrow import ESCROW_ABI
from escrow_py.keeper._config import MAX_CALLDATA_BYTES, TERMS_BYTES
from escrow_py.keeper._store import OpenEscrow

# Gas limit of a refund batch: BATCH_GAS + ENTRY_GAS per entry. A refund to a distinct buyer measures
# about 21k gas; the worst honest case (a FiatToken-like transfer with blacklist checks to a buyer whose
# balance slot is empty, 22.1k for that store alone, plus the entry's calldata) stays under 45k. A
# fixed bound costs the node nothing (eth_estimateGas would run each batch a dozen times) and bounds
# what a token that burns gas can waste in one batch.
#
# BATCH_GAS also holds what X402Escrow checks is left before each payout (its PAYOUT_GAS_NEEDED: the
# payout's 100k allowance, the 1/64 the EVM keeps back, 10k for the call itself). Without it a batch whose
# last payout comes after cheap entries reverts with InsufficientGas: a one-entry batch always did.
PAYOUT_GAS = 100_000
PAYOUT_GAS_NEEDED = PAYOUT_GAS + PAYOUT_GAS // 63 + 10_000
BATCH_GAS = 60_000 + PAYOUT_GAS_NEEDED
ENTRY_GAS = 45_000
# A batch that reverts when mined is split in this many parts (after splitting by token).
SPLIT_PARTS = 4


def _signature(item: dict[str, Any]) -> str:
    kind = str(item["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_signature(c) for c in item["components"]) + ")" + kind[5:]
    return kind


def _refund_many_selector() -> bytes:
    (function,) = [i for i in ESCROW_ABI if i.get("type") == "function" and i.get("name") == "refundMany"]
    return keccak(text=f"refundMany({','.join(_signature(i) for i in function['inputs'])})")[:4]


REFUND_MANY = _refund_many_selector()


def ordered(batch: Sequence[OpenEscrow]) -> list[OpenEscrow]:
    """Send order: by (token, buyer), so the contract pays consecutive entries to one buyer in one transfer."""
    return sorted(batch, key=lambda e: (e.token, e.buyer))


def refund_many_data(batch: Sequence[OpenEscrow]) -> bytes:
    """Calldata of refundMany(batch), entries in the order given."""
    return REFUND_MANY + encode(["uint256", "uint256"], [32, len(batch)]) + b"".join(e.encoded for e in batch)


def batch_gas(entries: int) -> int:
    return BATCH_GAS + ENTRY_GAS * entries


def max_entries(batch_size: int, max_batch_gas: int, block_gas_limit: int) -> int:
    """The most entries one transaction may carry: the configured size, the calldata cap, and the gas cap.

    A transaction over half a block's gas limit would wait for an empty block; over 128 KiB of data
    a node refuses it outright.
    """
    by_calldata = (MAX_CALLDATA_BYTES - len(REFUND_MANY) - 64) // TERMS_BYTES
    gas_cap = min(max_batch_gas, block_gas_limit // 2)
    by_gas = (gas_cap - BATCH_GAS) // ENTRY_GAS
    return max(1, min(batch_size, by_calldata, by_gas))


def fingerprint(ids: Sequence[bytes]) -> str:
    """Names a set of escrows whatever their order: a set that reverted when mined is never sent again."""
    return "0x" + keccak(b"".join(sorted(ids))).hex()


def split(ids: Sequence[bytes], tokens: dict[bytes, str]) -> list[list[bytes]]:
    """Parts of a batch that reverted when mined, to be sent on their own.

    First by token (a hostile token then sinks only its own part, and every other token's
    escrows go out in the next block); a batch of one token is cut into SPLIT_PARTS runs in
    send order, so one buyer's entries stay together.
    """
    by_token: dict[str, list[bytes]] = {}
    for escrow_id in ids:
        by_token.setdefault(tokens.get(escrow_id, ""), []).append(escrow_id)
    if len(by_token) > 1:
        return list(by_token.values())
    parts = min(SPLIT_PARTS, len(ids))
    size, extra = divmod(len(ids), parts)
    out, start = [], 0
    for n in range(parts):
        end = start + size + (1 if n < extra else 0)
        out.append(list(ids[start:end]))
        start = end
    return out
