"""The gas benchmark command runs end to end on its own fresh anvil and prints consistent figures for both tokens."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from escrow_devtools.bench.gas import OPERATIONS, TARGETS, TOKENS


@pytest.mark.slow
@pytest.mark.timeout(900)  # deploys Circle's FiatToken and measures every operation twice: minutes under load
def test_bench_gas_json_prints_every_figure_and_consistent_ratios_against_both_tokens(
    bench: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    out = bench("gas", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"] == list(TOKENS) == ["TestUSDC", "FiatToken"]
    for token in TOKENS:
        figures = result[token]
        assert isinstance(figures["exact"], int) and figures["exact"] > 21_000
        for key in OPERATIONS:
            assert isinstance(figures[key], int) and figures[key] > 0, (token, key)
            assert figures["ratios"][key] == round(figures[key] / figures["exact"], 3), (token, key)
        assert figures["targets"] == TARGETS[token]
        assert figures["met"] == {k: figures["ratios"][k] <= bound for k, bound in TARGETS[token].items()}
        # Gas on anvil is deterministic, so every issue target is a regression gate, not a report.
        missed = {k: (figures["ratios"][k], TARGETS[token][k]) for k, ok in figures["met"].items() if not ok}
        assert not missed, (token, missed)
        # A batch amortises the 21,000 base cost and the token's cold access: per item it is far cheaper.
        assert figures["deliver_many_per_item"] < figures["deliver"] - 21_000
        assert figures["refund_many_per_item_one_buyer"] < figures["refund"] - 21_000
        assert figures["settle_many_per_item"] < figures["settle"] - 21_000
        # One transfer per batch versus one per entry: the distinct-payee figures cost more per item.
        assert figures["refund_many_per_item_distinct_buyers"] > figures["refund_many_per_item_one_buyer"]
        assert figures["deliver_many_per_item_distinct_sellers"] > figures["deliver_many_per_item"]
    # Circle's proxy and checks make every plain payment dearer than on TestUSDC.
    assert result["FiatToken"]["exact"] > result["TestUSDC"]["exact"]
    assert "..." in out.stderr  # progress went to stderr, JSON alone to stdout
