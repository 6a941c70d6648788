"""The `x402-escrow` command.

Each role registers its own subcommands from its own module (`register(subparsers)`),
so this file only assembles them:

    x402-escrow dev                 a local chain with the escrow and a funded buyer, until Ctrl-C (development tool)
    x402-escrow contracts build     recompile contracts/ into the shipped artifacts (development tool)
    x402-escrow demo                play the escrow's five stories over HTTP (local anvil or --rpc)
    x402-escrow keeper run|status   refund expired escrows; show what is open
    x402-escrow bench gas [--json]  receipt gas of every escrow operation against x402 exact
    x402-escrow migrate --db URL    bring a store's schema to this version (SQLite or PostgreSQL)
    x402-escrow prune --db URL      delete settled rows past their deadline plus a grace period
    x402-escrow facilitator serve|keys   verify and settle for keyless sellers; their API keys
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

# Every subcommand: its one-line help and where its registrar lives. Only the registrar of the
# subcommand being run is imported: `--help` and `buyer report` do not pay for the keeper's, the
# seller's or the tools' imports (web3, the x402 SDK, pydantic models take seconds to import).
# The development tools (`dev`, `contracts`, `demo`, `bench`) live in `escrow_devtools`, outside the runtime.
COMMANDS: dict[str, tuple[str, str]] = {
    "dev": (
        "start a local chain with the escrow and a funded buyer, print the settings, run until Ctrl-C",
        "escrow_devtools.dev:register",
    ),
    "contracts": ("compile the Solidity sources into the shipped artifacts", "escrow_py.cli:register_contracts"),
    "demo": (
        "play the escrow's five stories over HTTP on a fresh local anvil (or an existing chain)",
        "escrow_py.cli:register_demo",
    ),
    "keeper": (
        "refund every expired, undelivered escrow (no live buyer needed)",
        "escrow_py.keeper._cli:register",
    ),
    "bench": (
        "run a benchmark on a fresh local anvil and print its figures",
        "escrow_devtools.bench.cli:register",
    ),
    "buyer": ("the buyer's journal and recovery", "escrow_py.buyer._cli:register"),
    "migrate": (
        "bring a store's schema to this version (each role also does it when it starts)",
        "escrow_py.storage._cli:register_migrate",
    ),
    "prune": (
        "delete settled rows past their deadline plus a grace period (keeps what recover() and audits need)",
        "escrow_py.storage._cli:register_prune",
    ),
    "facilitator": (
        "a delivery-escrow facilitator for sellers with no key and no RPC; its API keys",
        "escrow_py.facilitator._cli:register",
    ),
}


def register_contracts(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    contracts = sub.add_parser("contracts", help=COMMANDS["contracts"][0])
    actions = contracts.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build", help="recompile contracts/ into escrow_py/chain/artifacts/ and escrow_devtools/artifacts/"
    )
    build.set_defaults(func=_contracts_build)


def _contracts_build(args: argparse.Namespace) -> int:
    from escrow_devtools import build

    solc = build.find_solc()
    print(f"compiling with {solc}", file=sys.stderr)
    for path in build.write_artifacts(build.compile_contracts(solc)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help=COMMANDS["demo"][0],
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
    from escrow_devtools.demo import DemoOptions, run_demo

    options = DemoOptions(
        rpc_url=args.rpc_url, escrow=args.escrow, token=args.token, workdir=args.workdir, facilitator=args.facilitator
    )
    return 0 if run_demo(options) else 1


def registrar(command: str) -> Registrar:
    """The full registrar of one subcommand (imports its module)."""
    module, _, name = COMMANDS[command][1].partition(":")
    found: Registrar = getattr(importlib.import_module(module), name)
    return found


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argv names: its first positional argument (the top level takes only -h)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: the named subcommand in full, every other one as its name and help only.

    Without `argv` every subcommand is registered in full (slow: it imports every role and the tools).
    """
    parser = argparse.ArgumentParser(prog="x402-escrow", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = _command_in(argv) if argv is not None else None
    for command, (help_text, _) in COMMANDS.items():
        if argv is None or command == wanted:
            registrar(command)(sub)
        else:
            sub.add_parser(command, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from escrow_py.protocol.errors import EscrowError

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
