"""`x402-escrow bench http` runs end to end: every variant measured, every payment counted on chain.

It asserts the shape and the accounting, never a timing: speed is read from the benchmark's output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable

Bench = Callable[..., subprocess.CompletedProcess[str]]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as its own process (its refusals: exit status 2 before any import of the bench)."""
    command = [sys.executable, "-m", "escrow_py.cli", "bench", "http", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_bench_http_prints_every_variant_and_the_ratio(bench: Bench) -> None:
    out = bench("http", "--requests", "4", "--concurrency", "2", "--warmup", "1", "--block-time", "0", "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout).values()
    for name in ("unpaid", "escrow", "serve_first", "sdk_exact", "sdk_exact_inprocess", "facilitator"):
        row = result[name]
        # warm-up + latency + throughput phases, each request paid exactly once (checked on chain by the bench)
        assert row["requests"] == 1 + 4 + 4
        for key in ("p50_ms", "p95_ms", "rps"):
            assert row[key] > 0 and math.isfinite(row[key])
        assert row["p95_ms"] >= row["p50_ms"]
    expected = round(result["escrow"]["p50_ms"] / result["sdk_exact"]["p50_ms"], 3)
    assert result["ratio_p50_escrow_vs_sdk_exact"] == expected
    expected = round(result["serve_first"]["p50_ms"] / result["sdk_exact"]["p50_ms"], 3)
    assert result["ratio_p50_serve_first_vs_sdk_exact"] == expected
    assert result["targets"] == {"ratio_p50_serve_first_vs_sdk_exact": 0.5, "ratio_p50_facilitator_vs_escrow": 1.25}
    assert set(result["met"]) == set(result["targets"])
    keyless = round(result["facilitator"]["p50_ms"] / result["escrow"]["p50_ms"], 3)
    assert result["ratio_p50_facilitator_vs_escrow"] == keyless
    assert result["settings"] == {
        "requests": 4, "concurrency": 2, "warmup": 1, "anvil": "automine",
        "variants": ["unpaid", "escrow", "serve_first", "sdk_exact", "sdk_exact_inprocess", "facilitator"],
    }  # fmt: skip
    assert "checking every payment on chain" in out.stderr
    assert "waiting for the serve-first settlements" in out.stderr


def test_bench_http_refuses_nonsense_settings() -> None:
    out = _bench("--requests", "0")
    assert out.returncode == 2 and "--requests must be at least 1" in out.stderr


def test_bench_http_measures_only_the_variants_asked_for(bench: Bench) -> None:
    out = bench("http", "--requests", "2", "--concurrency", "1", "--warmup", "0", "--block-time", "0",
                 "--variant", "serve_first", "--variant", "sdk_exact", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout).values()
    assert result["settings"]["variants"] == ["serve_first", "sdk_exact"]
    for name in ("unpaid", "escrow", "sdk_exact_inprocess", "facilitator"):
        assert name not in result
    assert result["serve_first"]["requests"] == result["sdk_exact"]["requests"] == 2 + 2
    assert set(k for k in result if k.startswith("ratio_")) == {
        "ratio_p50_serve_first_vs_sdk_exact", "ratio_rps_serve_first_vs_sdk_exact"
    }  # fmt: skip
    assert result["targets"] == {"ratio_p50_serve_first_vs_sdk_exact": 0.5}
    assert "servers up: serve_first, sdk_exact" in out.stderr


def test_bench_http_refuses_an_unknown_variant() -> None:
    out = _bench("--variant", "serve-first")
    assert out.returncode == 2 and "--variant must be one of" in out.stderr and "serve-first" in out.stderr
