"""`x402-escrow keeper run` and `x402-escrow keeper status`.

Neither prints a traceback for a fault of its surroundings: a bad setting, a busy
metrics port, an RPC that is down or a database that cannot be opened each end
the command with status 2 and one line naming the setting and the value found.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from escrow_py.keeper._config import MAX_BATCH_SIZE, KeeperConfig
from escrow_py.logfmt import JsonFormatter, PlainFormatter


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keeper = sub.add_parser("keeper", help="refund every expired, undelivered escrow (no live buyer needed)")
    actions = keeper.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="index escrow events and refund expired escrows until SIGTERM")
    _common(run)
    # Numbers are taken as text and checked by KeeperConfig, whose errors name the setting.
    run.add_argument("--start-block", dest="start_block", help="first block to index (default 0)")
    run.add_argument("--confirmations", help="blocks before an event counts (default 1: mined)")
    run.add_argument("--batch-size", dest="batch_size",
                     help=f"escrows per refundMany (default 100, at most {MAX_BATCH_SIZE})")  # fmt: skip
    run.add_argument("--max-batch-gas", dest="max_batch_gas", help="gas limit of one refund batch (default 20M)")
    run.add_argument("--poll-interval", dest="poll_interval", help="seconds between cycles (default 2)")
    run.add_argument("--standby-after", dest="standby_after",
                     help="seconds past a deadline before this keeper refunds (a standby; default 0)")  # fmt: skip
    run.add_argument("--reorg-depth", dest="reorg_depth", help="blocks after which an event or a refund is final")
    run.add_argument("--retry-after", dest="retry_after",
                     help="seconds before a buyer whose refund the token refused is tried again (default 300, "
                     "doubled per refusal in a row, at most 6 h)")  # fmt: skip
    run.add_argument("--retention", help="seconds past its deadline a settled escrow's rows are kept, pruned hourly "
                     "(default 0: kept forever; else at least 3600)")  # fmt: skip
    run.add_argument("--keystore", help="encrypted keystore JSON (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE); "
                     "without it the key comes from X402_ESCROW_PRIVATE_KEY")  # fmt: skip
    run.add_argument("--buyer", dest="buyers", action="append", help="only refund this buyer's escrows (repeatable)")
    run.add_argument("--seller", dest="sellers", action="append", help="only refund this seller's escrows")
    run.add_argument("--metrics", help="serve /metrics, /healthz, /readyz on host:port")
    run.add_argument("--log-json", dest="log_json", action="store_true", default=None, help="JSON log lines")
    run.set_defaults(func=_run)
    status = actions.add_parser("status", help="open escrows, next deadlines, quarantine and indexing lag")
    _common(status)
    status.set_defaults(func=_status)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (settings under [keeper] or at top level)")
    parser.add_argument("--rpc", dest="rpc_url", help="JSON-RPC URL (or X402_ESCROW_RPC_URL)")
    parser.add_argument("--escrow", dest="escrows", action="append", help="escrow contract address (repeatable)")
    parser.add_argument("--network", help="CAIP-2 network the RPC must serve (default eip155:84532)")
    parser.add_argument(
        "--token", dest="tokens", action="append",
        help="refund this token's escrows besides the registry's (repeatable; '*': any token)",
    )  # fmt: skip
    parser.add_argument("--database", help="SQLite path, sqlite:/// URL or postgresql:// URL (default keeper.sqlite)")


def _config(args: argparse.Namespace) -> KeeperConfig:
    flags: dict[str, Any] = dict(vars(args))
    for key in ("escrows", "buyers", "sellers", "tokens"):
        if flags.get(key):
            flags[key] = ",".join(flags[key])
    return KeeperConfig.load(flags, config_file=args.config)


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    # The key and the chain stack (eth_account, web3: about 0.6 s of CPU) are imported once the settings
    # are read and checked: a bad setting ends the command without them.
    from escrow_py.chain.signer import load_signer
    from escrow_py.keeper._daemon import Keeper

    signer = load_signer(keystore=config.keystore)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_json else PlainFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stop = threading.Event()
    # Graceful: finish the cycle under way (a refund already recorded is followed up on restart).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    keeper = Keeper(config, signer)
    try:
        keeper.run(stop)  # start-up checks first: a failure ends the command with its message
    finally:
        keeper.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    config = _config(args)
    from escrow_py.keeper._status import print_status  # the chain stack, once the settings are good (see _run)

    return print_status(config)
