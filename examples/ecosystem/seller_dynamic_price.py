"""Prices and payees decided per request, like the SDK's DynamicPrice and DynamicPayTo.

`uvicorn examples.ecosystem.seller_dynamic_price:app`: `/report/x?size=large` costs $0.05, any
other size $0.01; reports on partner items pay the partner (`PARTNER_ADDRESS`).
"""

import os

from fastapi import FastAPI
from x402.http import HTTPRequestContext

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

app = FastAPI()


@app.get("/report/{item}")
async def report(item: str, size: str = "small") -> dict[str, str]:
    return {"item": item, "size": size}


def price(request: HTTPRequestContext) -> str:  # may also be async
    return "$0.05" if request.adapter.get_query_param("size") == "large" else "$0.01"


def pay_to(request: HTTPRequestContext) -> str:
    partner = request.path.startswith("/report/partner-")
    return os.environ["PARTNER_ADDRESS"] if partner else os.environ["SELLER_ADDRESS"]


app.add_middleware(
    EscrowMiddleware,
    config=SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        pay_to=os.environ["SELLER_ADDRESS"],
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),
        # A fixed price that the token cannot carry exactly ("$0.0000001") stops the start with ConfigError.
        routes=[PricedRoute("GET", "/report/{item}", price=price, pay_to=pay_to)],
        store="seller.sqlite",
    ),
)
