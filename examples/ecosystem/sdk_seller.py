"""delivery-escrow on the official SDK's own resource server and middleware, beside `exact`.

`uvicorn examples.ecosystem.sdk_seller:app`. `ESCROW_FACILITATOR_URL` is a facilitator that
lists delivery-escrow in its /supported (with the operator that deposits and delivers),
`X402_FACILITATOR_URL` one that settles exact. Stock SDK clients pay exact; escrow-aware ones
(this project's clients, or the SDK client with DeliveryEscrowScheme) pay delivery-escrow.
"""

import os

from fastapi import FastAPI
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, PaymentOption, RouteConfig
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.mechanisms.evm.exact import ExactEvmServerScheme

from escrow_py.seller import DeliveryEscrowServerScheme

NETWORK = "eip155:84532"
seller = os.environ["SELLER_ADDRESS"]

escrow = DeliveryEscrowServerScheme(token=os.environ.get("X402_ESCROW_TOKEN"))  # default: the network's USDC
server = x402ResourceServer(
    [
        HTTPFacilitatorClient(FacilitatorConfig(url=os.environ["ESCROW_FACILITATOR_URL"])),
        HTTPFacilitatorClient(FacilitatorConfig(url=os.environ["X402_FACILITATOR_URL"])),
    ]
)
server.register(NETWORK, escrow)
server.register(NETWORK, ExactEvmServerScheme())

# One price for both: "$0.01" in the token's atomic units, with its EIP-712 domain (exact needs it
# spelled out for a token outside the SDK's table, such as a local TestUSDC).
price = escrow.parse_price("$0.01", NETWORK)
accepts = [
    PaymentOption(scheme="delivery-escrow", pay_to=seller, price=price, network=NETWORK),
    PaymentOption(scheme="exact", pay_to=seller, price=price, network=NETWORK),
]

app = FastAPI()


@app.get("/report/{item}")
async def report(item: str) -> dict[str, str]:
    return {"item": item}


app.add_middleware(PaymentMiddlewareASGI, server=server, routes={"GET /report/:item": RouteConfig(accepts=accepts)})
