"""Pay with the official x402 SDK client and this project's delivery-escrow plugin.

`python examples/ecosystem/sdk_buyer.py http://127.0.0.1:8000/report/7`. The plugin checks the
delivery itself (a response hook): a body that is not the one paid for raises DeliveryMismatch.
"""

import asyncio
import os
import sys

import httpx
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_py.buyer import DeliveryEscrowScheme, PaymentError
from escrow_py.chain.signer import LocalSigner


async def main(url: str) -> bytes:
    with DeliveryEscrowScheme(LocalSigner.from_env(), os.environ["X402_ESCROW_RPC_URL"], "buyer.sqlite") as scheme:
        client = x402Client().register("eip155:84532", scheme)
        # The SDK pays only the assets of its own table (USDC on Base and Base Sepolia) unless told: a
        # test token (a local chain's TestUSDC) must be allowed, with a cap per payment in atomic units.
        token = os.environ.get("X402_ESCROW_TOKEN")
        if token:
            allowed = [{"network": "eip155:84532", "asset": token, "max_amount_per_payment": "100000"}]
            client.set_spend_controls({"allowed_assets": allowed})
        transport = x402_httpx_transport(client)
        hooks = {"response": [scheme.check_response]}
        async with httpx.AsyncClient(transport=transport, event_hooks=hooks, timeout=60) as http:
            response = await http.get(url)
    response.raise_for_status()
    return response.content


if __name__ == "__main__":
    try:
        print(asyncio.run(main(sys.argv[1])).decode())
    except PaymentError as exc:
        sys.exit(f"not delivered: {exc}")
