"""`x402-escrow bench ...`: benchmarks that print numbers (JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="run a benchmark on a fresh local anvil and print its figures")
    kinds = bench.add_subparsers(dest="kind", required=True)
    gas = kinds.add_parser("gas", help="receipt gas of deposit, deliver, refund and batches vs x402 exact")
    gas.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    gas.set_defaults(func=_gas)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _gas(args: argparse.Namespace) -> int:
    from escrow_py.bench.gas import measure_gas

    result = measure_gas(progress=_progress)
    _print(result, args.json)
    return 0


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    ratios = result.get("ratios", {})
    targets = result.get("targets", {})
    print(f"{'operation':<24}{'gas':>10}{'x exact':>10}{'target':>10}")
    for key, value in result.items():
        if isinstance(value, int) and not isinstance(value, bool) and key != "batch_size":
            ratio = ratios.get(key, 1.0 if key == "exact" else "")
            target = targets.get(key, "")
            print(f"{key:<24}{value:>10}{ratio!s:>10}{target!s:>10}")
