"""Compiled contracts that only the tests, the benchmarks and the demo use.

`CONTRACTS` are compiled from `contracts/` by `escrow_devtools.build`, beside the runtime's own
(`escrow_py.chain.artifacts.CONTRACTS`); a test recompiles both and checks they are identical.
`CIRCLE_CONTRACTS` are Circle's FiatToken v2.2 (USDC) behind its proxy, built from Circle's public
sources and shipped as built, under `circle/` (see `circle/NOTICE.md`: the commit, the compiler,
the licence): the second gas baseline, and a real USDC to test the escrow against.

`load_artifact` and `deploy` take any contract name, the runtime's included. Importing this module
registers the custom errors of these contracts with `escrow_py.chain.tx.decode_revert`, so that a
hostile token's revert is reported by name in tests as the escrow's are.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress

from escrow_py.chain import artifacts as runtime
from escrow_py.chain.escrow import deploy as deploy_artifact
from escrow_py.chain.tx import TxSender, register_errors

ARTIFACTS_DIR = Path(__file__).resolve().parent
CIRCLE_DIR = ARTIFACTS_DIR / "circle"

# The hostile tokens, the look-alike escrow, the helpers the tests use, and the keeper benchmark's minter.
CONTRACTS = (
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
    "ReturnBombToken",
)

# Circle's USDC implementation, its proxy, and the library the implementation links to.
CIRCLE_CONTRACTS = ("FiatTokenV2_2", "FiatTokenProxy", "SignatureChecker")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of any contract of the project: the runtime's, the test ones, or Circle's."""
    if name in runtime.CONTRACTS:
        return runtime.load_artifact(name)
    if name in CONTRACTS:
        path = ARTIFACTS_DIR / f"{name}.json"
    elif name in CIRCLE_CONTRACTS:
        path = CIRCLE_DIR / f"{name}.json"
    else:
        known = runtime.CONTRACTS + CONTRACTS + CIRCLE_CONTRACTS
        raise KeyError(f"unknown contract {name!r}; known: {', '.join(known)}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def deploy(sender: TxSender, contract: str, *constructor_args: Any, confirmations: int = 1) -> ChecksumAddress:
    """`escrow_py.chain.escrow.deploy` for any contract by name (X402Escrow still to its one address)."""
    if contract in runtime.CONTRACTS:
        return deploy_artifact(sender, contract, *constructor_args, confirmations=confirmations)
    return deploy_artifact(sender, load_artifact(contract), *constructor_args, confirmations=confirmations)


for _name in CONTRACTS + CIRCLE_CONTRACTS:
    register_errors(load_artifact(_name)["abi"])
