"""Compile `contracts/` into the runtime's artifacts and the tools' (escrow_devtools/artifacts).

A development tool, run from a checkout (`make artifacts` or
`x402-escrow contracts build`): the runtime never compiles. It drives
py-solc-x's `compile_standard` with a native `solc` of the pinned version when
one is installed, and otherwise with `scripts/solc-js.cjs`, a stand-in backed
by the npm package `solc` (no native compiler can be downloaded offline). Both
produce the same bytecode for the same version and settings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from escrow_devtools import artifacts as tooling
from escrow_py.chain import artifacts as runtime
from escrow_py.protocol.errors import EscrowError

SOLC_VERSION = "0.8.30"

# Part of the interface of the shipped artifacts: ape-config.yaml repeats them
# so that an Ape build reproduces the same runtime bytecode. `bytecodeHash:
# none` keeps the metadata trailer free of source paths, so the bytecode does
# not depend on where the checkout lives.
SOLC_SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 1_000_000},
    "evmVersion": "cancun",
    "viaIR": True,
    "metadata": {"bytecodeHash": "none"},
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}

REPO_ROOT = Path(__file__).resolve().parents[1]

# Where each compiled contract is written: the runtime ships only what it uses.
DESTINATIONS: dict[str, Path] = {
    **{name: runtime.ARTIFACTS_DIR for name in runtime.CONTRACTS},
    **{name: tooling.ARTIFACTS_DIR for name in tooling.CONTRACTS},
}
CONTRACTS = tuple(DESTINATIONS)
CONTRACTS_DIR = REPO_ROOT / "contracts"
SOLCJS_WRAPPER = REPO_ROOT / "scripts" / "solc-js.cjs"


class BuildError(EscrowError, RuntimeError):
    """The contracts did not compile, or no compiler could be found."""


def _version_of(binary: str | Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("Version: "):
            return line.removeprefix("Version: ").split("+")[0]
    return None


def find_solc() -> Path:
    """A native solc of `SOLC_VERSION` if there is one, else the solc-js wrapper."""
    candidates: list[Path] = []
    if found := shutil.which("solc"):
        candidates.append(Path(found))
    candidates.append(Path.home() / ".solcx" / f"solc-v{SOLC_VERSION}")
    for candidate in candidates:
        # The wrapper may itself be installed under ~/.solcx for ape-solidity.
        if candidate.is_file() and candidate.resolve() != SOLCJS_WRAPPER.resolve():
            text = candidate.read_bytes()[:64]
            if not text.startswith(b"#!") and _version_of(candidate) == SOLC_VERSION:
                return candidate
    if not SOLCJS_WRAPPER.is_file():
        raise BuildError(f"no solc {SOLC_VERSION} found and {SOLCJS_WRAPPER} is missing (build from a checkout)")
    if _version_of(SOLCJS_WRAPPER) != SOLC_VERSION:
        raise BuildError(f"{SOLCJS_WRAPPER} does not answer as solc {SOLC_VERSION}: run `npm ci` first")
    return SOLCJS_WRAPPER


def sources() -> dict[str, dict[str, str]]:
    """Every .sol file under contracts/, keyed by its path relative to the checkout (as Ape names them)."""
    return {
        path.relative_to(REPO_ROOT).as_posix(): {"content": path.read_text(encoding="utf8")}
        for path in sorted(CONTRACTS_DIR.rglob("*.sol"))
    }


# ape-solidity's output selection (ape_solidity._utils.OUTPUT_SELECTION), per source, with its AST.
APE_OUTPUT_SELECTION = [
    "abi", "bin-runtime", "devdoc", "userdoc",
    "evm.bytecode.object", "evm.bytecode.sourceMap", "evm.deployedBytecode.object",
]  # fmt: skip
TEST_SOURCES = "contracts/test/"


def deployed_input() -> dict[str, Any]:
    """The standard-JSON input of the deployed contracts (everything outside contracts/test/).

    Shaped exactly as ape-solidity shapes its own (source ids, output selection, the order of
    the keys) when scripts/deploy.py compiles these sources with `bytecodeHash: none`: the
    solc-js wrapper's cache then answers both from one compile. Another shape costs a second
    compile, never a wrong answer (tests/deploy/test_deploy.py checks that the two are the same).
    """
    chosen = {k: v for k, v in sorted(sources().items()) if not k.startswith(TEST_SOURCES)}
    settings = {
        "optimizer": SOLC_SETTINGS["optimizer"],
        "outputSelection": {source: {"*": APE_OUTPUT_SELECTION, "": ["ast"]} for source in chosen},
        "metadata": SOLC_SETTINGS["metadata"],
        "evmVersion": SOLC_SETTINGS["evmVersion"],
        "viaIR": SOLC_SETTINGS["viaIR"],
    }
    return {"sources": chosen, "settings": settings, "language": "Solidity"}


def tooling_input() -> dict[str, Any]:
    """The standard-JSON input that generates code for the test contracts only (the tooling artifacts)."""
    every = sources()
    selection = {
        source: {"*": SOLC_SETTINGS["outputSelection"]["*"]["*"]} for source in every if source.startswith(TEST_SOURCES)
    }
    return {"language": "Solidity", "sources": every, "settings": {**SOLC_SETTINGS, "outputSelection": selection}}


def compile_input(standard_input: dict[str, Any], binary: Path) -> dict[str, Any]:
    """The output of one standard-JSON input, through py-solc-x as Ape calls it; BuildError on an error."""
    import solcx  # development dependency only

    try:
        output: dict[str, Any] = solcx.compile_standard(standard_input, solc_binary=binary, base_path=str(REPO_ROOT))
    except solcx.exceptions.SolcError as exc:
        raise BuildError(str(exc)) from exc
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise BuildError("\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors))
    return output


def compile_contracts(solc: Path | None = None) -> dict[str, dict[str, Any]]:
    """Compile every contract; return the artifact dict of each shipped contract by name."""
    binary = solc or find_solc()
    # Two independent inputs, compiled side by side (each compile is one single-threaded process).
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(
            pool.map(lambda standard_input: compile_input(standard_input, binary), [deployed_input(), tooling_input()])
        )
    artifacts: dict[str, dict[str, Any]] = {}
    for output in outputs:
        for source_id, contracts in output["contracts"].items():
            for name, out in contracts.items():
                if name not in CONTRACTS:
                    continue
                artifacts[name] = {
                    "contractName": name,
                    "sourceName": source_id.removeprefix("contracts/"),
                    "compiler": {"version": SOLC_VERSION, "settings": _settings_without_selection()},
                    "abi": out["abi"],
                    "bytecode": "0x" + out["evm"]["bytecode"]["object"],
                    "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
                }
    missing = set(CONTRACTS) - set(artifacts)
    if missing:
        raise BuildError(f"contracts not found in the sources: {sorted(missing)}")
    return artifacts


def _settings_without_selection() -> dict[str, Any]:
    return {k: v for k, v in SOLC_SETTINGS.items() if k != "outputSelection"}


def render(artifact: dict[str, Any]) -> str:
    """The exact text written for an artifact: stable key order, one trailing newline."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def write_artifacts(artifacts: dict[str, dict[str, Any]], directory: Path | None = None) -> list[Path]:
    """Write each artifact to its destination (`DESTINATIONS`), or all of them into `directory`."""
    written = []
    for name, artifact in sorted(artifacts.items()):
        path = (directory or DESTINATIONS[name]) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(artifact))
        written.append(path)
    return written
