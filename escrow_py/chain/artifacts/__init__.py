"""Compiled contracts shipped with the package (ABI and bytecode, one JSON file each).

Written by `escrow_py.chain.build`; a test recompiles and checks they are identical.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ARTIFACTS_DIR = Path(__file__).resolve().parent

# The escrow, the USDC-like test token, the hostile tokens the tests use, and the keeper benchmark's minter.
CONTRACTS = (
    "X402Escrow",
    "TestUSDC",
    "ReentrantToken",
    "FalseReturningToken",
    "BlockingToken",
    "GasPriceCheckingToken",
    "BatchMinter",
)


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of a shipped contract: `abi`, `bytecode`, `deployedBytecode`, `compiler`."""
    if name not in CONTRACTS:
        raise KeyError(f"unknown contract {name!r}; shipped: {', '.join(CONTRACTS)}")
    data: dict[str, Any] = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    return data
