"""The shipped artifacts are exactly what the sources compile to: they can never drift."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from escrow_devtools import artifacts as tooling
from escrow_devtools import build
from escrow_py.chain import artifacts as runtime


@pytest.mark.slow
@pytest.mark.timeout(900)  # solc-js through viaIR: minutes on a loaded two-core machine
def test_shipped_artifacts_equal_a_fresh_compile() -> None:
    fresh = build.compile_contracts()
    assert set(fresh) == set(runtime.CONTRACTS) | set(tooling.CONTRACTS)
    for where in (runtime, tooling):
        shipped = sorted(p.stem for p in where.ARTIFACTS_DIR.glob("*.json"))
        assert shipped == sorted(where.CONTRACTS), f"{where.ARTIFACTS_DIR}: a file without a contract, or the reverse"
    for name, artifact in fresh.items():
        text = (build.DESTINATIONS[name] / f"{name}.json").read_text()
        assert text == build.render(artifact), f"{name}.json differs from a fresh compile: run `make artifacts`"
        assert len(artifact["deployedBytecode"]) > 2, name


def test_the_runtime_ships_only_the_escrow_and_its_token_binding() -> None:
    assert runtime.CONTRACTS == ("X402Escrow", "TestUSDC")


def _wrapper(standard_input: dict[str, Any], base: Path, cache: Path) -> tuple[dict[str, Any], str]:
    """Compile through scripts/solc-js.cjs with its cache in `cache`: (output, what the cache did)."""
    env = {**os.environ, "X402_ESCROW_SOLC_CACHE": str(cache), "X402_ESCROW_SOLC_CACHE_LOG": "1"}
    done = subprocess.run(
        ["node", str(build.SOLCJS_WRAPPER), "--standard-json", "--base-path", str(base)],
        input=json.dumps(standard_input), env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout), done.stderr


def _multicall(output: dict[str, Any]) -> dict[str, Any]:
    contract: dict[str, Any] = output["contracts"]["EscrowMulticall.sol"]["EscrowMulticall"]
    return contract


@pytest.mark.parametrize("given", ["inline", "from disk"])
def test_the_compile_cache_misses_when_a_source_byte_changes(tmp_path: Path, given: str) -> None:
    """A cache hit only for the very same input and the same files read: a changed byte compiles afresh."""
    source = tmp_path / "EscrowMulticall.sol"
    source.write_text((build.CONTRACTS_DIR / "test" / "EscrowMulticall.sol").read_text())
    cache = tmp_path / "cache"

    def compile_it() -> tuple[dict[str, Any], str]:
        # Inline as build.py and Ape give sources; by path (read through the import callback) as crytic-compile.
        entry = {"content": source.read_text()} if given == "inline" else {"urls": [source.name]}
        # The ABI alone: no code generation, so each miss costs little more than loading the compiler.
        settings = {"outputSelection": {"*": {"*": ["abi"]}}}
        standard_input = {"language": "Solidity", "sources": {source.name: entry}, "settings": settings}
        return _wrapper(standard_input, tmp_path, cache)

    first, how = compile_it()
    assert "cache miss" in how and "CallFailed" in json.dumps(_multicall(first)["abi"])
    again, how = compile_it()
    assert "cache hit" in how and again == first

    source.write_text(source.read_text().replace("CallFailed", "CallFailEd"))  # one byte
    changed, how = compile_it()
    assert "cache miss" in how, how
    abi = json.dumps(_multicall(changed)["abi"])
    assert "CallFailEd" in abi and "CallFailed" not in abi


def test_two_compiles_of_the_same_input_at_once_compile_it_once(tmp_path: Path) -> None:
    """xdist runs the artifacts test and Ape's check side by side: the second waits for the first's entry."""
    source = "contracts/test/EscrowMulticall.sol"
    standard_input = {
        "language": "Solidity",
        "sources": {source: build.sources()[source]},
        "settings": build.SOLC_SETTINGS,
    }
    log = tmp_path / "cache.log"
    env = {**os.environ, "X402_ESCROW_SOLC_CACHE": str(tmp_path / "cache"), "X402_ESCROW_SOLC_CACHE_LOG": str(log)}
    command = ["node", str(build.SOLCJS_WRAPPER), "--standard-json"]
    both = []
    for stdin in (tmp_path / "in-0.json", tmp_path / "in-1.json"):  # each reads its input at once
        stdin.write_text(json.dumps(standard_input))
        with stdin.open() as given:
            both.append(subprocess.Popen(command, stdin=given, stdout=subprocess.PIPE, env=env, text=True))
    outputs = [json.loads(p.communicate(timeout=300)[0]) for p in both]
    assert outputs[0] == outputs[1] and "EscrowMulticall" in outputs[0]["contracts"][source]
    said = log.read_text().splitlines()
    assert sum(line.startswith("compiled ") for line in said) == 1, said
