"""`x402-escrow buyer recover`: finish a crashed buyer's payments from its journal file."""

from __future__ import annotations

import argparse
import json
import os

from escrow_py.buyer._recover import recover
from escrow_py.chain.signer import load_signer
from escrow_py.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    buyer = sub.add_parser("buyer", help="the buyer's journal and recovery")
    actions = buyer.add_subparsers(dest="action", required=True)
    rec = actions.add_parser("recover", help="replay, refund or void every unfinished journaled payment")
    rec.add_argument("--journal", required=True, help="the buyer's journal (SQLite path or sqlite:/// URL)")
    rec.add_argument("--rpc", dest="rpc_url", help="JSON-RPC URL (or X402_ESCROW_RPC_URL)")
    rec.add_argument("--keystore", help="encrypted keystore JSON (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE); "
                     "without it the key comes from X402_ESCROW_PRIVATE_KEY")  # fmt: skip
    rec.add_argument("--leave-to-keeper", dest="leave", action="store_true",
                     help="do not refund expired escrows from the buyer's key")  # fmt: skip
    rec.set_defaults(func=_recover)


def _recover(args: argparse.Namespace) -> int:
    rpc_url = args.rpc_url or os.environ.get("X402_ESCROW_RPC_URL")
    if not rpc_url:
        raise ConfigError("buyer recover needs --rpc or X402_ESCROW_RPC_URL")
    report = recover(args.journal, load_signer(keystore=args.keystore), rpc_url, refund_expired=not args.leave)
    for item in report.items:
        line = {
            "escrowId": "0x" + item.escrow_id.hex(),
            "chainState": item.chain_state.name.lower(),
            "action": item.action.value,
            "journalState": item.journal_state.value,
            "outcome": item.outcome,
        }
        print(json.dumps(line))
    return 0
