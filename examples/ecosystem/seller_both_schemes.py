"""One route, one 402, two schemes: the SDK's `exact` for stock clients, delivery-escrow for protected ones.

Run it with `uvicorn examples.ecosystem.seller_both_schemes:app`; `X402_FACILITATOR_URL` is the
x402 facilitator that settles `exact` (the same one an SDK seller would use).
"""

import os

from fastapi import FastAPI
from x402.http import FacilitatorConfig, HTTPFacilitatorClient

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, ExactOffer, PricedRoute, SellerConfig

app = FastAPI()


@app.get("/report/{item}")
async def report(item: str) -> dict[str, str]:
    return {"item": item, "report": f"all about {item}"}


@app.get("/archive/{item}")
async def archive(item: str) -> dict[str, str]:
    return {"item": item, "archive": "large and slow: sold with delivery protection only"}


facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=os.environ["X402_FACILITATOR_URL"]))
app.add_middleware(
    EscrowMiddleware,
    config=SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        pay_to=os.environ["SELLER_ADDRESS"],
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),
        exact=ExactOffer(facilitator),  # accepts: [delivery-escrow, exact]; first=True puts exact first
        routes=[
            PricedRoute("GET", "/report/{item}", price="$0.01"),  # 10000 atomic units of USDC
            PricedRoute("GET", "/archive/{item}", price="$0.05", schemes=("delivery-escrow",)),  # no exact here
        ],
        store="seller.sqlite",
    ),
)
