"""The seller's own checks and bookkeeping around verify and settle, like the SDK's server hooks.

`uvicorn examples.ecosystem.seller_hooks:app`: payers listed in `BLOCKED_PAYERS` (comma-separated)
are refused with a 402 whose error is `payer_blocked`, before any money moves; every settled
payment is written to `sales.log`.
"""

import os

from fastapi import FastAPI
from x402.schemas import AbortResult, SettleResultContext, VerifyContext

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig, SellerHooks

app = FastAPI()
blocked = {a.strip().lower() for a in os.environ.get("BLOCKED_PAYERS", "").split(",") if a.strip()}


@app.get("/report/{item}")
async def report(item: str) -> dict[str, str]:
    return {"item": item}


def refuse_blocked(context: VerifyContext) -> AbortResult | None:
    payer = str(context.payment_payload.payload.get("authorization", {}).get("from", "")).lower()
    return AbortResult(reason="payer_blocked", message="not served here") if payer in blocked else None


async def book(context: SettleResultContext) -> None:
    with open("sales.log", "a") as log:
        log.write(f"{context.requirements.scheme} {context.result.payer} {context.requirements.amount}\n")


app.add_middleware(
    EscrowMiddleware,
    config=SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        pay_to=os.environ["SELLER_ADDRESS"],
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),
        hooks=SellerHooks().on_before_verify(refuse_blocked).on_after_settle(book),
        routes=[PricedRoute("GET", "/report/{item}", price="$0.01")],
        store="seller.sqlite",
    ),
)
