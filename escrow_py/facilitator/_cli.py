"""`x402-escrow facilitator serve|keys`: run the facilitator; create, list and revoke sellers' API keys.

    x402-escrow facilitator serve --rpc URL --escrow 0x.. --token 0x.. [--database facilitator.sqlite|postgresql://...]
    x402-escrow facilitator keys create --name shop --pay-to 0x.. [--database ...]   # prints the key once
    x402-escrow facilitator keys list | revoke KEY_ID

The operator key comes from --keystore (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE) or
X402_ESCROW_PRIVATE_KEY; it is never printed or logged. The console is served at
/console?token=... when X402_ESCROW_CONSOLE_TOKEN is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from escrow_py.facilitator._config import DEFAULT_RETENTION, MIN_RETENTION
from escrow_py.protocol.errors import ConfigError

CONSOLE_TOKEN_ENV = "X402_ESCROW_CONSOLE_TOKEN"  # noqa: S105 - the variable's name, not a secret
DATABASE_HELP = (
    "SQLite path (default facilitator.sqlite) or a postgresql:// URL, which several replicas share (schema facilitator)"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "facilitator", help="a delivery-escrow facilitator for sellers with no key and no RPC; its API keys"
    )
    actions = parser.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve /supported /verify /settle /deliver /refund /escrows")
    serve.add_argument("--rpc", dest="rpc_url", default=os.environ.get("X402_ESCROW_RPC_URL"), help="JSON-RPC URL")
    serve.add_argument("--escrow", required=True, help="X402Escrow address")
    serve.add_argument("--token", required=True, help="the ERC-3009 token it settles")
    serve.add_argument("--network", default="eip155:84532", help="CAIP-2 network (default eip155:84532)")
    serve.add_argument("--token-name", default="USDC", help="the token's EIP-712 name (default USDC)")
    serve.add_argument("--token-version", default="2", help="the token's EIP-712 version (default 2)")
    serve.add_argument("--database", default="facilitator.sqlite", help=DATABASE_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8402)
    serve.add_argument("--keystore", help="encrypted keystore JSON (else X402_ESCROW_PRIVATE_KEY)")
    serve.add_argument("--rate", type=float, default=50.0, help="requests per second per API key (default 50)")
    serve.add_argument("--burst", type=int, default=100, help="requests at once per API key (default 100)")
    serve.add_argument("--poster-interval", type=float, default=0.5, help="seconds between delivery batches")
    serve.add_argument(
        "--settle-batch-wait", type=float, default=0.0,
        help="seconds a queued serve-first settlement may wait for others to share its settleMany (default 0)",
    )  # fmt: skip
    serve.add_argument(
        "--idempotency-retention", type=float, default=DEFAULT_RETENTION,
        help=f"seconds an idempotency record is kept, pruned hourly (default {DEFAULT_RETENTION}, 7 days; at least "
        f"{MIN_RETENTION}; 0 keeps them forever)",
    )  # fmt: skip
    serve.add_argument(
        "--explorer-url", help="block explorer the console links transactions to (default: Basescan on Base Sepolia "
        "and Base; none on any other chain or on a development node such as anvil)",
    )  # fmt: skip
    serve.set_defaults(func=_serve)
    keys = actions.add_parser("keys", help="sellers' API keys")
    key_actions = keys.add_subparsers(dest="key_action", required=True)
    create = key_actions.add_parser("create", help="a new key (printed once; only its hash is stored)")
    create.add_argument("--name", required=True, help="who the key is for")
    create.add_argument("--pay-to", dest="pay_to", action="append", required=True, help="payTo it owns (repeatable)")
    listing = key_actions.add_parser("list", help="keys, their payTo and whether revoked")
    revoke = key_actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.add_argument("--database", default="facilitator.sqlite", help=DATABASE_HELP)
    create.set_defaults(func=_keys_create)
    listing.set_defaults(func=_keys_list)
    revoke.set_defaults(func=_keys_revoke)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from escrow_py.chain.signer import load_signer
    from escrow_py.facilitator._app import create_app
    from escrow_py.facilitator._config import FacilitatorConfig
    from escrow_py.facilitator._keys import KeyStore
    from escrow_py.facilitator._service import Facilitator

    if not args.rpc_url:
        raise ConfigError("facilitator serve needs --rpc or X402_ESCROW_RPC_URL")
    config = FacilitatorConfig(
        rpc_url=args.rpc_url,
        escrow=args.escrow,
        token=args.token,
        network=args.network,
        operator=load_signer(keystore=args.keystore),
        store=args.database,
        token_name=args.token_name,
        token_version=args.token_version,
        rate=args.rate,
        burst=args.burst,
        poster_interval=args.poster_interval,
        settle_batch_wait=args.settle_batch_wait,
        idempotency_retention=args.idempotency_retention,
        explorer_url=args.explorer_url,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    facilitator = Facilitator(config)
    app = create_app(facilitator, KeyStore(args.database), console_token=os.environ.get(CONSOLE_TOKEN_ENV) or None)
    print(f"facilitator for {config.network} operator {config.operator.address} on {args.host}:{args.port}",
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from escrow_py.facilitator._keys import KeyStore

    store = KeyStore(args.database)
    try:
        key_id, key = store.create(args.name, args.pay_to)
    finally:
        store.close()
    print(f"key id {key_id}; the key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from escrow_py.facilitator._keys import KeyStore

    store = KeyStore(args.database)
    try:
        keys = store.list()
    finally:
        store.close()
    for key in keys:
        state = "revoked" if key.revoked else "live"
        print(f"{key.key_id}\t{state}\t{key.name}\t{','.join(sorted(key.pay_to))}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from escrow_py.facilitator._keys import KeyStore

    store = KeyStore(args.database)
    try:
        revoked = store.revoke(args.key_id)
    finally:
        store.close()
    if not revoked:
        print(f"no live key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0
