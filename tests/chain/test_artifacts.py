"""The shipped artifacts are exactly what the sources compile to: they can never drift."""

from __future__ import annotations

from escrow_py.chain import build
from escrow_py.chain.artifacts import ARTIFACTS_DIR, CONTRACTS


def test_shipped_artifacts_equal_a_fresh_compile() -> None:
    fresh = build.compile_contracts()
    assert set(fresh) == set(CONTRACTS)
    shipped = sorted(p.stem for p in ARTIFACTS_DIR.glob("*.json"))
    assert shipped == sorted(CONTRACTS), "an artifact file without a contract, or a contract without its file"
    for name, artifact in fresh.items():
        text = (ARTIFACTS_DIR / f"{name}.json").read_text()
        assert text == build.render(artifact), f"{name}.json differs from a fresh compile: run `make artifacts`"
        assert len(artifact["deployedBytecode"]) > 2, name
