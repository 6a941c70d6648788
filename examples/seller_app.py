"""A priced FastAPI app. Run it with `uvicorn examples.seller_app:app`."""

import os

from fastapi import FastAPI

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

app = FastAPI()


@app.get("/report/{item}")
async def report(item: str) -> dict[str, str]:
    return {"item": item, "report": f"all about {item}"}


app.add_middleware(
    EscrowMiddleware,
    config=SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",  # Base Sepolia
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),  # USDC
        pay_to=os.environ["SELLER_ADDRESS"],  # receives the payments
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),  # pays gas for deposit, deliver, refund
        routes=[PricedRoute("GET", "/report/{item}", amount=10_000, max_timeout_seconds=120)],  # 0.01 USDC
        store="seller.sqlite",
    ),
)
