"""`x402-escrow buyer recover` (finish a crashed buyer's payments) and `buyer report` (where the money went)."""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from escrow_py.buyer._journal import Journal
from escrow_py.buyer._ledger import LedgerRow, LedgerStatus
from escrow_py.buyer._recover import recover
from escrow_py.chain.rpc import DEFAULT_DEADLINE
from escrow_py.chain.signer import load_signer
from escrow_py.protocol.errors import ConfigError
from escrow_py.storage import is_postgres_url, sqlite_path

JOURNAL_HELP = "the buyer's journal (SQLite path, sqlite:/// or postgresql:// URL)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    buyer = sub.add_parser("buyer", help="the buyer's journal and recovery")
    actions = buyer.add_subparsers(dest="action", required=True)
    rec = actions.add_parser("recover", help="replay, refund or void every unfinished journaled payment")
    rec.add_argument("--journal", required=True, help=JOURNAL_HELP)
    rec.add_argument("--rpc", dest="rpc_url", help="JSON-RPC URL (or X402_ESCROW_RPC_URL)")
    rec.add_argument("--keystore", help="encrypted keystore JSON (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE); "
                     "without it the key comes from X402_ESCROW_PRIVATE_KEY")  # fmt: skip
    rec.add_argument("--leave-to-keeper", dest="leave", action="store_true",
                     help="do not refund expired escrows from the buyer's key")  # fmt: skip
    rec.add_argument("--rpc-timeout", type=float, default=DEFAULT_DEADLINE,
                     help=f"seconds one chain call may take, retries included ({DEFAULT_DEADLINE:g})")  # fmt: skip
    rec.set_defaults(func=_recover)
    rep = actions.add_parser("report", help="spend by task and by seller, reservations, and open payments")
    rep.add_argument("--journal", required=True, help=JOURNAL_HELP)
    rep.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    rep.set_defaults(func=_report)


def _recover(args: argparse.Namespace) -> int:
    rpc_url = args.rpc_url or os.environ.get("X402_ESCROW_RPC_URL")
    if not rpc_url:
        raise ConfigError("buyer recover needs --rpc or X402_ESCROW_RPC_URL")
    signer = load_signer(keystore=args.keystore)
    report = recover(args.journal, signer, rpc_url, refund_expired=not args.leave, rpc_timeout=args.rpc_timeout)
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


def _report(args: argparse.Namespace) -> int:
    if not is_postgres_url(args.journal) and not sqlite_path(args.journal).exists():
        raise ConfigError(f"no journal at {args.journal}")
    journal = Journal(args.journal, audit=False)  # reading: nothing to audit
    try:
        report = build_report(journal)
    finally:
        journal.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for title, key in (("spend by task", "by_task"), ("spend by seller", "by_seller")):
        print(title)
        print(f"  {'':<44} {'token':<44} {'spent':>14} {'reserved':>14} {'released':>14}")
        for row in report[key]:
            print(
                f"  {row['name']:<44} {row['token']:<44} {row['spent']:>14} {row['reserved']:>14} {row['released']:>14}"
            )
    print(f"reservations ({len(report['reservations'])})")
    for row in report["reservations"]:
        print(f"  {row['escrowId']}  {row['amount']:>12}  task {row['task']}  seller {row['seller']}")
    print(f"open payments ({len(report['open'])})")
    for row in report["open"]:
        print(
            f"  {row['escrowId']}  {row['state']:<9} {row['amount']:>12}  deadline {row['deadline']}  {row['seller']}"
        )
    return 0


def build_report(journal: Journal) -> dict[str, Any]:
    """Totals per (task, token) and (seller, token) by ledger status, open reservations, unfinished payments."""
    rows = journal.ledger_rows()

    def totals(name_of: Callable[[LedgerRow], str]) -> list[dict[str, Any]]:
        sums: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {s.value: 0 for s in LedgerStatus})
        for row in rows:
            sums[(name_of(row), row.token)][row.status.value] += row.amount
        return [{"name": name, "token": token, **by} for (name, token), by in sorted(sums.items())]

    return {
        "by_task": totals(lambda r: r.task),
        "by_seller": totals(lambda r: r.seller),
        "reservations": [
            {
                "escrowId": "0x" + r.escrow_id.hex(),
                "amount": r.amount,
                "task": r.task,
                "seller": r.seller,
                "token": r.token,
            }
            for r in rows
            if r.status is LedgerStatus.RESERVED
        ],
        "open": [
            {
                "escrowId": "0x" + e.escrow_id.hex(),
                "state": e.state.value,
                "amount": e.terms.amount,
                "seller": e.terms.seller,
                "deadline": e.terms.deadline,
            }
            for e in journal.entries(unfinished_only=True)
        ],
    }
