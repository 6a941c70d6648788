"""A buyer in its own process that SIGKILLs itself at one point of paying (the crash tests run it).

    python crash_agent.py RPC_URL JOURNAL SHOP_URL POINT

POINT `signed`: just after the authorization is signed, before the payment is journaled.
POINT `journaled`: once the payment is journaled, just before the paid request would leave.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import httpx

from escrow_devtools.anvil import dev_private_key, dev_signer
from escrow_py.buyer import EscrowClient
from escrow_py.chain.signer import LocalSigner
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

BUYER = 1  # the anvil dev account the tests' buyer uses


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DiesAfterSigning(LocalSigner):
    """The buyer's key, killing the process once it has made a signature (no shutdown, nothing flushed)."""

    def sign_typed_data(self, typed_data: dict[str, Any]) -> bytes:
        super().sign_typed_data(typed_data)
        die()
        raise AssertionError("unreachable")


class DiesBeforePaidSend(httpx.HTTPTransport):
    """The real transport, killing the process when the request carrying the payment is about to leave."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if PAYMENT_SIGNATURE_HEADER in request.headers:
            die()
        return super().handle_request(request)


def main() -> None:
    rpc_url, journal, shop, point = sys.argv[1:]
    signer = DiesAfterSigning.from_key(dev_private_key(BUYER)) if point == "signed" else dev_signer(BUYER)
    transport = DiesBeforePaidSend() if point == "journaled" else httpx.HTTPTransport()
    with EscrowClient(signer, rpc_url, journal, transport=transport, timeout=60) as client:
        client.get(f"{shop}/report/crash")
    raise SystemExit(f"the agent was to die at {point!r} and did not")


if __name__ == "__main__":
    main()
