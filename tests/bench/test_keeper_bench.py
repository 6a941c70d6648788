"""The keeper benchmark runs end to end (small) and reports the four keeper figures, consistently."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

Bench = Callable[..., subprocess.CompletedProcess[str]]


def _measure(bench: Bench, *args: str) -> dict[str, Any]:
    # A few seconds of idle window prove the idle figure is measured; the README's comes from a full run (20 s).
    out = bench("keeper", *args, "--idle-window", "3", "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.slow
def test_bench_keeper_refunds_every_escrow_of_distinct_buyers_and_reports_the_figures(bench: Bench) -> None:
    result = _measure(bench, "--escrows", "12")
    assert result["escrows"] == 12 and result["distinct_buyers"] == 12
    assert isinstance(result["blocks_to_all_refunded"], int) and result["blocks_to_all_refunded"] >= 0
    assert isinstance(result["refund_transactions"], int) and 1 <= result["refund_transactions"] <= 12
    assert result["wasted_gas_fraction"] == 0.0  # one keeper: every transaction refunded something
    # The four figures of the targets, each a positive measurement.
    for figure in ("keeper_peak_rss_mb", "keeper_cpu_ms_per_refund", "keeper_idle_cpu_s_per_s"):
        assert isinstance(result[figure], float) and result[figure] > 0, figure
    assert result["targets"] == {"blocks_to_all_refunded": 20, "keeper_peak_rss_mb": 150,
                                 "keeper_cpu_ms_per_refund": 1.0, "keeper_idle_cpu_s_per_s": 0.05}  # fmt: skip
    # Blocks are deterministic on anvil: the latency target is a gate (CPU and memory are machine noise).
    assert result["blocks_to_all_refunded"] <= result["targets"]["blocks_to_all_refunded"]
    cpu = result["keeper_cpu_s_indexing"] + result["keeper_cpu_s_refunding"]
    assert abs(cpu * 1000 / 12 - result["keeper_cpu_ms_per_refund"]) < 2
    # Distinct buyers: no two refunds share a transfer, so a refund costs well above the one-buyer figure.
    assert isinstance(result["gas_per_refund"], int) and 15_000 < result["gas_per_refund"] < 60_000


@pytest.mark.slow
def test_bench_keeper_with_racing_keepers_reports_the_gas_they_waste(bench: Bench) -> None:
    result = _measure(bench, "--escrows", "6", "--keepers", "2")
    assert result["keepers"] == 2
    assert isinstance(result["wasted_gas_fraction"], float) and 0.0 <= result["wasted_gas_fraction"] < 1.0
    assert isinstance(result["keeper_transactions"], int) and result["keeper_transactions"] >= 1


def test_bench_keeper_refuses_an_idle_window_of_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "bench", "keeper", "--idle-window", "0"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--idle-window must be above 0 seconds" in out.stderr
