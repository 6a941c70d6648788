"""A buyer agent as its own process, the way an agent uses the buyer client: pay for a URL, or,
after a crash, recover what the journal says it paid for.

    X402_ESCROW_PRIVATE_KEY=0x... python -m escrow_devtools.demo.agent pay URL --journal J --rpc RPC
    X402_ESCROW_PRIVATE_KEY=0x... python -m escrow_devtools.demo.agent recover --journal J --rpc RPC

Every step is one JSON line on stdout, so a parent process (the demo, the integration
tests) can follow it and kill it at the worst moment. Bodies travel base64-encoded.
The key comes from the environment (or a keystore) and is never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from escrow_py.buyer import EscrowClient, PaymentError, recover
from escrow_py.chain.signer import load_signer
from escrow_py.protocol.terms import delivery_hash


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _pay(args: argparse.Namespace) -> int:
    signer = load_signer(keystore=args.keystore)
    _say("paying", url=args.url, buyer=signer.address)
    with EscrowClient(signer, args.rpc, args.journal, timeout=args.timeout) as client:
        try:
            response = client.get(args.url)
        except PaymentError as exc:
            escrow_id = None if exc.escrow_id is None else "0x" + exc.escrow_id.hex()
            _say("failed", error=type(exc).__name__, escrowId=escrow_id, message=str(exc))
            return 2
    _say(
        "delivered",
        status=response.status_code,
        deliveryHash="0x" + delivery_hash(response.content).hex(),
        body=base64.b64encode(response.content).decode(),
    )
    return 0


def _recover(args: argparse.Namespace) -> int:
    signer = load_signer(keystore=args.keystore)
    report = recover(args.journal, signer, args.rpc, refund_expired=not args.leave_to_keeper)
    for item in report.items:
        _say(
            "recovered",
            escrowId="0x" + item.escrow_id.hex(),
            chainState=item.chain_state.name.lower(),
            action=item.action.value,
            journalState=item.journal_state.value,
            outcome=item.outcome,
            body=None if item.body is None else base64.b64encode(item.body).decode(),
        )
    _say("done", payments=len(report.items))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m escrow_devtools.demo.agent", description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    pay = actions.add_parser("pay", help="GET a priced URL, paying its delivery-escrow 402")
    pay.add_argument("url")
    pay.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout in seconds")
    pay.set_defaults(func=_pay)
    rec = actions.add_parser("recover", help="finish every unfinished payment in the journal")
    rec.add_argument("--leave-to-keeper", action="store_true", help="do not refund expired escrows itself")
    rec.set_defaults(func=_recover)
    for sub in (pay, rec):
        sub.add_argument("--journal", required=True, help="the buyer's journal (SQLite)")
        sub.add_argument("--rpc", required=True, help="JSON-RPC URL")
        sub.add_argument("--keystore", help="keystore JSON; without it the key is X402_ESCROW_PRIVATE_KEY")
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
