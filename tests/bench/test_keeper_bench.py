"""The keeper benchmark runs end to end (small) and reports consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_keeper_refunds_every_escrow_and_reports_the_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "bench", "keeper", "--escrows", "8", "--json"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["escrows"] == 8
    assert result["blocks_to_all_refunded"] >= 1  # a refund can only land after a block at the deadline exists
    assert result["seconds_to_all_refunded"] >= 0
    assert 1 <= result["refund_transactions"] <= 8
    ratio = result["gas_per_refund"] / result["reference_refund_many_per_item"]
    assert abs(result["gas_per_refund_vs_reference"] - ratio) < 0.002  # gas_per_refund is rounded down
    assert result["keeper_peak_rss_mb"] > 10 and result["keeper_cpu_s"] > 0
