"""`x402-escrow bench scale` runs end to end: every variant measured and audited on chain.

It asserts the shape and the accounting (no nonce error, no second handler run, no replay whose
bytes are not the committed ones), never a timing: speed is read from the benchmark's output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable

import pytest


@pytest.mark.slow
def test_bench_scale_prints_every_variant_with_clean_accounting(
    bench: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    out = bench("scale", "--buyers", "3", "--requests", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for name in ("sqlite_1", "postgresql_1", "postgresql_2", "postgresql_3"):
        row = result[name]
        assert (row["requests"], row["ok"], row["failed"]) == (9, 9, 0)
        assert row["nonce_errors"] == row["duplicate_handler_runs"] == row["mismatched_replays"] == 0
        assert row["double_deposits"] == 0
        assert row["p95_ms"] >= row["p50_ms"] > 0 and math.isfinite(row["req_per_s"])
    expected = round(result["postgresql_1"]["p50_ms"] / result["sqlite_1"]["p50_ms"], 3)
    assert result["ratio_p50_postgresql_1_vs_sqlite_1"] == expected
    assert result["target_ratio_p50"] == 1.15


def test_bench_scale_refuses_nonsense_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "bench", "scale", "--buyers", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "--buyers must be at least 1" in out.stderr
