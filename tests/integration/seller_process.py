"""The integration tests' seller as its own process: the demo shop behind the middleware, on uvicorn.

With --die-after-handler the process SIGKILLs itself at the worst moment for a seller:
the handler has run, the response is stored and its delivery (or, --serve-first, its
settlement) queued, and not one byte of the answer has left. The poster interval is then an hour, so nothing is posted
before the kill; the restarted process has to post it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from escrow_devtools.demo._shop import SERVE_FIRST_LIMITS, build_shop, routes
from escrow_py.chain.signer import LocalSigner
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER
from escrow_py.seller import SellerConfig


def die_after_handler(app: ASGIApp) -> ASGIApp:
    """Kill the process when the middleware starts a paid answer (it stores and queues before that)."""
    marker = PAYMENT_RESPONSE_HEADER.lower().encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_die(message: Message) -> None:
            if message["type"] == "http.response.start" and any(k.lower() == marker for k, _ in message["headers"]):
                os.kill(os.getpid(), signal.SIGKILL)
            await send(message)

        await app(scope, receive, send_or_die)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--rpc", "--escrow", "--token", "--pay-to", "--store"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--die-after-handler", action="store_true")
    parser.add_argument("--serve-first", action="store_true")
    args = parser.parse_args()
    settlement = "serve-first" if args.serve_first else "hold"
    limits = SERVE_FIRST_LIMITS if args.serve_first else {}
    config = SellerConfig(
        rpc_url=args.rpc,
        escrow=args.escrow,
        token=args.token,
        network="eip155:84532",
        pay_to=args.pay_to,
        operator=LocalSigner.from_env("X402_ESCROW_PRIVATE_KEY"),
        routes=routes(settlement),
        store=args.store,
        poster_interval=3600.0 if args.die_after_handler else 0.1,
        **limits,  # type: ignore[arg-type]
    )
    app: ASGIApp = build_shop(config, work_seconds=0.0)
    if args.die_after_handler:
        app = die_after_handler(app)
    uvicorn.run(app, host="127.0.0.1", port=args.port, lifespan="on", log_level="warning")


if __name__ == "__main__":
    main()
