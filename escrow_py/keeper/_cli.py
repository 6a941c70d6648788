"""`x402-escrow keeper run` and `x402-escrow keeper status`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from web3 import HTTPProvider, Web3

from escrow_py.chain.signer import load_signer
from escrow_py.keeper._config import KeeperConfig
from escrow_py.keeper._daemon import JsonFormatter, Keeper
from escrow_py.keeper._store import KeeperStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keeper = sub.add_parser("keeper", help="refund every expired, undelivered escrow (no live buyer needed)")
    actions = keeper.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="index escrow events and refund expired escrows until SIGTERM")
    _common(run)
    run.add_argument("--start-block", dest="start_block", type=int, help="first block to index (default 0)")
    run.add_argument("--confirmations", type=int, help="blocks before an event counts (default 1: mined)")
    run.add_argument("--batch-size", dest="batch_size", type=int, help="escrows per refundMany (default 100)")
    run.add_argument("--poll-interval", dest="poll_interval", type=float, help="seconds between cycles (default 2)")
    run.add_argument("--keystore", help="encrypted keystore JSON (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE); "
                     "without it the key comes from X402_ESCROW_PRIVATE_KEY")  # fmt: skip
    run.add_argument("--buyer", dest="buyers", action="append", help="only refund this buyer's escrows (repeatable)")
    run.add_argument("--seller", dest="sellers", action="append", help="only refund this seller's escrows")
    run.add_argument("--metrics", help="serve /metrics, /healthz, /readyz on host:port")
    run.add_argument("--log-json", dest="log_json", action="store_true", default=None, help="JSON log lines")
    run.set_defaults(func=_run)
    status = actions.add_parser("status", help="open escrows, next deadlines and indexing lag")
    _common(status)
    status.set_defaults(func=_status)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (settings under [keeper] or at top level)")
    parser.add_argument("--rpc", dest="rpc_url", help="JSON-RPC URL (or X402_ESCROW_RPC_URL)")
    parser.add_argument("--escrow", dest="escrows", action="append", help="escrow contract address (repeatable)")
    parser.add_argument("--database", help="SQLite path or sqlite:/// URL (default keeper.sqlite)")


def _config(args: argparse.Namespace) -> KeeperConfig:
    flags: dict[str, Any] = dict(vars(args))
    for key in ("escrows", "buyers", "sellers"):
        if flags.get(key):
            flags[key] = ",".join(flags[key])
    return KeeperConfig.load(flags, config_file=args.config)


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    signer = load_signer(keystore=config.keystore)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if config.log_json else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stop = threading.Event()
    # Graceful: finish the cycle under way (a refund already recorded is followed up on restart).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    keeper = Keeper(config, signer)
    logging.getLogger("x402_escrow.keeper").info(
        "keeper started", extra={"keeper": signer.address, "escrows": list(config.escrows), "database": config.database}
    )
    try:
        keeper.run(stop)
    finally:
        keeper.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    flags = dict(vars(args))
    if flags.get("escrows"):
        flags["escrows"] = ",".join(flags["escrows"])
    config = KeeperConfig.load(flags, config_file=args.config)
    w3 = Web3(HTTPProvider(config.rpc_url, request_kwargs={"timeout": 30}))
    store = KeeperStore(config.database)
    head = int(w3.eth.block_number)
    chain_time = int(w3.eth.get_block("latest")["timestamp"])
    for address in config.escrows:
        checkpoint = store.checkpoint(address)
        counts = store.counts(address)
        lag = "never indexed" if checkpoint is None else f"{head - checkpoint} blocks behind head {head}"
        print(f"escrow {address}: {lag}")
        print(f"  held {counts['held']}, released {counts['released']}, refunded {counts['refunded']}")
        open_ = store.open_escrows(address)
        expired = sum(1 for e in open_ if e.terms.deadline <= chain_time)
        print(f"  open escrows: {len(open_)} ({expired} past their deadline)")
        for entry in open_[:10]:
            when = entry.terms.deadline - chain_time
            due = f"in {when}s" if when > 0 else f"{-when}s ago"
            print(f"    0x{entry.id.hex()}  {entry.terms.amount:>12}  deadline {entry.terms.deadline} ({due})")
    attempts = store.attempt_counts()
    if attempts:
        print("refund transactions: " + ", ".join(f"{k} {v}" for k, v in sorted(attempts.items())))
    print(f"chain time {chain_time} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(chain_time))} UTC)")
    store.close()
    return 0
