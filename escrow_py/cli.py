"""The `x402-escrow` command.

Each role registers its own subcommands from its own module (`register(subparsers)`),
so this file only assembles them:

    x402-escrow contracts build     recompile contracts/ into the shipped artifacts
    x402-escrow demo                play the escrow's four stories over HTTP (local anvil or --rpc)
    x402-escrow keeper run|status   refund expired escrows; show what is open
    x402-escrow bench gas [--json]  receipt gas of every escrow operation against x402 exact
    x402-escrow facilitator serve|keys   verify and settle for keyless sellers; their API keys
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from escrow_py.errors import EscrowError

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _register_contracts(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    contracts = sub.add_parser("contracts", help="compile the Solidity sources into the shipped artifacts")
    actions = contracts.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="recompile contracts/ and rewrite escrow_py/chain/artifacts/")
    build.set_defaults(func=_contracts_build)


def _contracts_build(args: argparse.Namespace) -> int:
    from escrow_py.chain import build

    solc = build.find_solc()
    print(f"compiling with {solc}", file=sys.stderr)
    for path in build.write_artifacts(build.compile_contracts(solc)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="play the escrow's four stories over HTTP on a fresh local anvil (or an existing chain)",
        description="Without --rpc: a fresh anvil, deployed contracts and dev keys. With --rpc and --escrow: an "
        "existing chain, the buyer, seller and keeper keys from X402_ESCROW_BUYER_KEY, X402_ESCROW_SELLER_KEY and "
        "X402_ESCROW_KEEPER_KEY (each defaults to X402_ESCROW_PRIVATE_KEY); the buyer needs 0.05 USDC, the seller "
        "and the keeper ETH for gas.",
    )
    demo.add_argument("--rpc", dest="rpc_url", help="JSON-RPC URL of an existing chain (with --escrow)")
    demo.add_argument("--escrow", help="X402Escrow address on that chain")
    demo.add_argument("--token", help="ERC-3009 token (default: the chain's known USDC)")
    demo.add_argument("--workdir", type=Path, help="where journals, stores and logs go (default: a new temp dir)")
    demo.add_argument(
        "--facilitator",
        action="store_true",
        help="the seller holds no key and no RPC: a facilitator on loopback holds the seller's key and settles",
    )
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from escrow_py.demo import DemoOptions, run_demo

    options = DemoOptions(
        rpc_url=args.rpc_url, escrow=args.escrow, token=args.token, workdir=args.workdir, facilitator=args.facilitator
    )
    return 0 if run_demo(options) else 1


def _registrars() -> list[Registrar]:
    from escrow_py.bench.cli import register as bench
    from escrow_py.buyer._cli import register as buyer
    from escrow_py.facilitator._cli import register as facilitator
    from escrow_py.keeper._cli import register as keeper

    return [_register_contracts, _register_demo, keeper, bench, buyer, facilitator]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x402-escrow", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except EscrowError as exc:
        print(f"x402-escrow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
