"""Compiled contracts shipped with the package (ABI and bytecode, one JSON file each).

`CONTRACTS` are compiled from `contracts/` by `escrow_py.chain.build`; a test recompiles
and checks they are identical. `CIRCLE_CONTRACTS` are Circle's FiatToken v2.2 (USDC) behind
its proxy, built from Circle's public sources and shipped as built, under `circle/`
(see `circle/NOTICE.md`: the commit, the compiler, the licence): the second gas baseline,
and a real USDC to test the escrow against.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ARTIFACTS_DIR = Path(__file__).resolve().parent
CIRCLE_DIR = ARTIFACTS_DIR / "circle"

# The escrow, the USDC-like test token, the hostile tokens, the look-alike escrow, the helpers the tests
# use, and the keeper benchmark's minter.
CONTRACTS = (
    "X402Escrow",
    "TestUSDC",
    "ReentrantToken",
    "FalseReturningToken",
    "BlockingToken",
    "LookAlikeEscrow",
    "NoReturnToken",
    "ShortReturnToken",
    "SimulationOnlyToken",
    "SmartWallet",
    "EscrowMulticall",
    "GasBurningToken",
    "BatchMinter",
)

# Circle's USDC implementation, its proxy, and the library the implementation links to.
CIRCLE_CONTRACTS = ("FiatTokenV2_2", "FiatTokenProxy", "SignatureChecker")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of a shipped contract: `abi`, `bytecode`, `deployedBytecode`, and how it was built."""
    if name in CONTRACTS:
        path = ARTIFACTS_DIR / f"{name}.json"
    elif name in CIRCLE_CONTRACTS:
        path = CIRCLE_DIR / f"{name}.json"
    else:
        raise KeyError(f"unknown contract {name!r}; shipped: {', '.join(CONTRACTS + CIRCLE_CONTRACTS)}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data
