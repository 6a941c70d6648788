"""The shipped artifacts are exactly what the sources compile to: they can never drift."""

from __future__ import annotations

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
