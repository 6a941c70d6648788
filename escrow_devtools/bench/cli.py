"""`x402-escrow bench gas|keeper|http|scale|storage`: benchmarks that print numbers (JSON with --json)."""

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
    keeper = kinds.add_parser(
        "keeper",
        help="N escrows of N distinct buyers expiring together on 1-second blocks: blocks, memory, CPU and gas "
        "for keepers to refund all",
    )
    keeper.add_argument("--escrows", type=int, default=1000, help="how many escrows expire together (default 1000)")
    keeper.add_argument("--keepers", type=int, default=1, help="independent keeper processes racing (1-3; default 1)")
    keeper.add_argument(
        "--idle-window", dest="idle_window", type=float,
        help="seconds of idle CPU measured after the burst (default 20; a test's smoke run needs a few)",
    )  # fmt: skip
    keeper.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    keeper.set_defaults(func=_keeper)
    http = kinds.add_parser(
        "http",
        help="latency and throughput of a paid route: escrow (hold and serve-first) vs the SDK's exact vs unpaid, "
        "on loopback, on an automining anvil and on 2-second blocks",
    )
    http.add_argument("--requests", type=int, default=100, help="requests per variant and phase (default 100)")
    http.add_argument("--concurrency", type=int, default=8, help="workers in the throughput phase (default 8)")
    http.add_argument("--warmup", type=int, default=5, help="unmeasured requests per variant first (default 5)")
    http.add_argument(
        "--block-time",
        type=float,
        action="append",
        help="anvil block time in seconds, repeatable (0: automine; default: automine, then 2)",
    )
    http.add_argument(
        "--variant",
        action="append",
        help="measure only this variant, repeatable: unpaid, escrow, serve_first, sdk_exact, sdk_exact_inprocess, "
        "facilitator (default: every one; a ratio is printed when both its variants ran)",
    )
    http.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    http.set_defaults(func=_http)
    scale = kinds.add_parser(
        "scale",
        help="seller replicas on one store behind a balancer: 1, 2, 3 on PostgreSQL and 1 on SQLite, with "
        "duplicates and replays; latency, throughput, nonce errors, duplicate handler runs, mismatched replays",
    )
    scale.add_argument("--buyers", type=int, default=20, help="buyers paying at once (default 20)")
    scale.add_argument("--requests", type=int, default=10, help="paid requests per buyer (default 10)")
    scale.add_argument(
        "--postgres-url", help="a PostgreSQL server whose user may create databases (default: a throwaway one)"
    )
    scale.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    scale.set_defaults(func=_scale)
    storage = kinds.add_parser(
        "storage", help="each per-request and per-cycle store query at 100,000 payments, on SQLite and PostgreSQL"
    )
    storage.add_argument("--rows", type=int, default=100_000, help="payments per store (default 100000)")
    storage.add_argument("--repeat", type=int, default=200, help="timed runs per query (default 200)")
    storage.add_argument(
        "--engine", action="append", choices=["sqlite", "postgresql"], help="only this engine (repeatable)"
    )
    storage.add_argument("--pg-url", dest="pg_url", help="an existing PostgreSQL database (default: a throwaway one)")
    storage.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    storage.set_defaults(func=_storage)


def _progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _gas(args: argparse.Namespace) -> int:
    from escrow_devtools.bench.gas import measure_gas

    result = measure_gas(progress=_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tokens = result["tokens"]
    header = f"{'operation':<40}" + "".join(f"{name + ' gas':>16}{'x exact':>9}{'target':>8}" for name in tokens)
    print(header + "    (! a target missed)")
    for op in ("exact", *result[tokens[0]]["ratios"]):
        row = f"{op:<40}"
        for name in tokens:
            figures = result[name]
            ratio = 1.0 if op == "exact" else figures["ratios"][op]
            target = str(figures["targets"].get(op, ""))
            if op in figures["met"]:
                target += "" if figures["met"][op] else "!"
            row += f"{figures[op]:>16,}{ratio:>9}{target:>8}"
        print(row)
    return 0


def _keeper(args: argparse.Namespace) -> int:
    if args.escrows < 1:
        print("x402-escrow: --escrows must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.keepers <= 3:
        print("x402-escrow: --keepers must be 1, 2 or 3", file=sys.stderr)
        return 2
    if args.idle_window is not None and not args.idle_window > 0:
        print("x402-escrow: --idle-window must be above 0 seconds", file=sys.stderr)
        return 2
    from escrow_devtools.bench.keeper import measure_keeper

    idle = {} if args.idle_window is None else {"idle_window": args.idle_window}
    result = measure_keeper(args.escrows, keepers=args.keepers, progress=_progress, **idle)
    _print(result, args.json)
    return 0


def _http(args: argparse.Namespace) -> int:
    # Settings are checked before the bench's imports (web3, the x402 SDK, the seller: seconds of CPU).
    if not _at_least_one(args, "requests", "concurrency"):
        return 2
    if args.block_time and any(t < 0 for t in args.block_time):
        print("x402-escrow: --block-time must be >= 0 (0: automine)", file=sys.stderr)
        return 2
    from escrow_devtools.bench.http import VARIANTS, measure_http_chains

    block_times = tuple(t or None for t in args.block_time) if args.block_time else (None, 2.0)
    variants = tuple(dict.fromkeys(args.variant)) if args.variant else VARIANTS
    if unknown := [v for v in variants if v not in VARIANTS]:
        print(f"x402-escrow: --variant must be one of {', '.join(VARIANTS)}, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    results = measure_http_chains(
        block_times=block_times,
        requests=args.requests,
        concurrency=args.concurrency,
        warmup=max(0, args.warmup),
        variants=variants,
        progress=_progress,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    chains = list(results)
    print(f"{'variant':<22}" + "".join(f"{c + ' p50 ms':>20}{'p95 ms':>10}{'rps':>8}" for c in chains))
    for name in (v for v in VARIANTS if v in variants):
        row = "".join(f"{r[name]['p50_ms']:>20}{r[name]['p95_ms']:>10}{r[name]['rps']:>8}" for r in results.values())
        print(f"{name:<22}{row}")
    print(f"{'ratio':<44}" + "".join(f"{c:>14}{'target':>8}" for c in chains) + "    (! a target missed)")
    keys = [k for k in results[chains[0]] if k.startswith("ratio_")]
    for key in keys:
        row = ""
        for result in results.values():
            target = result["targets"].get(key)
            shown = "" if target is None else f"{target}{'' if result['met'][key] else '!'}"
            row += f"{result[key]:>14}{shown:>8}"
        print(f"{key:<44}{row}")
    return 0


def _scale(args: argparse.Namespace) -> int:
    if not _at_least_one(args, "buyers", "requests"):
        return 2
    from escrow_devtools.bench.scale import VARIANTS, measure_scale

    result = measure_scale(
        buyers=args.buyers, requests_per_buyer=args.requests, postgres_url=args.postgres_url, progress=_progress
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    columns = ("p50_ms", "p95_ms", "req_per_s", "ok", "failed", "nonce_errors", "duplicate_handler_runs",
               "mismatched_replays", "double_deposits")  # fmt: skip
    print(f"{'variant':<14}" + "".join(f"{c:>{max(9, len(c) + 2)}}" for c in columns))
    for engine, count in VARIANTS:
        row = result[f"{engine}_{count}"]
        print(f"{engine + ' x' + str(count):<14}" + "".join(f"{row[c]!s:>{max(9, len(c) + 2)}}" for c in columns))
    print(f"p50 PostgreSQL x1 / SQLite x1: {result['ratio_p50_postgresql_1_vs_sqlite_1']} "
          f"(target <= {result['target_ratio_p50']})")  # fmt: skip
    return 0


def _at_least_one(args: argparse.Namespace, *names: str) -> bool:
    """Whether each named count is at least 1 (else the rule broken is printed)."""
    for name in names:
        if getattr(args, name) < 1:
            print(f"x402-escrow: --{name} must be at least 1", file=sys.stderr)
            return False
    return True


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    targets = result.get("targets", {})
    for key, value in result.items():  # the keeper benchmark: one figure per line
        if key != "targets":
            print(f"{key:<32}{value!s:>12}{targets.get(key, '')!s:>8}")


def _storage(args: argparse.Namespace) -> int:
    from escrow_devtools.bench.storage import measure_storage

    engines = tuple(dict.fromkeys(args.engine or ["sqlite", "postgresql"]))
    result = measure_storage(
        rows=args.rows, repeat=args.repeat, engines=engines, pg_url=args.pg_url, progress=_progress
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'engine':<11}{'store':<8}{'query':<42}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'cpu ms':>9}")
    for engine, roles in result["engines"].items():
        for role, figures in roles.items():
            if "skipped" in figures:
                print(f"{engine:<11}{role:<8}skipped: {figures['skipped']}")
            for name, q in figures.get("queries", {}).items():
                print(
                    f"{engine:<11}{role:<8}{name:<42}{q['p50_ms']:>9}{q['p95_ms']:>9}{q['max_ms']:>9}{q['cpu_ms']:>9}"
                )
    verdict = "yes" if result["met"] else "no: " + "; ".join(result["over_target"])
    print(f"every p50 under {result['target_p50_ms']} ms: {verdict}")
    return 0
