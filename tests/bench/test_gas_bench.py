"""The gas benchmark command runs end to end on its own fresh anvil and prints consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_gas_json_prints_every_figure_and_consistent_ratios() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "escrow_py.cli", "bench", "gas", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    result = json.loads(out.stdout)
    keys = ("deposit", "deliver", "refund", "deliver_many_per_item", "refund_many_per_item")
    assert isinstance(result["exact"], int) and result["exact"] > 21_000
    for key in keys:
        assert isinstance(result[key], int) and result[key] > 0, key
        assert result["ratios"][key] == round(result[key] / result["exact"], 3), key
    # A batch amortises the 21,000 base cost and the token's cold access: per item it is far cheaper.
    assert result["deliver_many_per_item"] < result["deliver"] - 21_000
    assert result["refund_many_per_item"] < result["refund"] - 21_000
    assert "..." in out.stderr  # progress went to stderr, JSON alone to stdout
