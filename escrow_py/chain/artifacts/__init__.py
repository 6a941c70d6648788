"""Compiled contracts the runtime needs (ABI and bytecode, one JSON file each).

`CONTRACTS` are compiled from `contracts/` by `escrow_devtools.build` (`x402-escrow contracts
build`); a test recompiles and checks they are identical. The runtime ships only what it uses:
the escrow, and TestUSDC, whose ABI is the runtime's ERC-3009 token binding (`chain.token`) and
which local deployments (`scripts/deploy.py`) put beside the escrow. The hostile test tokens,
the test helpers and Circle's FiatToken baseline are tooling: they live in
`escrow_devtools/artifacts/`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ARTIFACTS_DIR = Path(__file__).resolve().parent

CONTRACTS = ("X402Escrow", "TestUSDC")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of a shipped contract: `abi`, `bytecode`, `deployedBytecode`, and how it was built."""
    if name not in CONTRACTS:
        raise KeyError(f"unknown contract {name!r}; the runtime ships: {', '.join(CONTRACTS)}")
    data: dict[str, Any] = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    return data
