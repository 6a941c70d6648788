"""The seller's own checks and bookkeeping around verify and settle, like the SDK's server hooks.

`uvicorn examples.ecosystem.seller_hooks:app`: payers listed in `BLOCKED_PAYERS` (comma-separated)
are refused with a 402 whose error is `payer_blocked`, before any money moves; every settled
payment is written to `sales.log`. `/report/{item}` is held in escrow before it is served;
`/quote/{item}` is served first and settled later in batches: its after-settle hook runs when the
settlement is mined, and its before-settle hook may still decline a quote after it was made
(`/quote/stale`: the buyer gets 402 `quote_withdrawn` and is never charged).
"""

import os

from fastapi import FastAPI
from x402.schemas import AbortResult, SettleContext, SettleResultContext, VerifyContext

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig, SellerHooks

app = FastAPI()
blocked = {a.strip().lower() for a in os.environ.get("BLOCKED_PAYERS", "").split(",") if a.strip()}


@app.get("/report/{item}")
async def report(item: str) -> dict[str, str]:
    return {"item": item}


@app.get("/quote/{item}")
async def quote(item: str) -> dict[str, str]:
    return {"quote": item}


def refuse_blocked(context: VerifyContext) -> AbortResult | None:
    payer = str(context.payment_payload.payload.get("authorization", {}).get("from", "")).lower()
    return AbortResult(reason="payer_blocked", message="not served here") if payer in blocked else None


def withdraw_stale_quotes(context: SettleContext) -> AbortResult | None:
    # Serve-first runs this after the handler ("after-handler"): declining means not collecting.
    stale = context.phase == "after-handler" and context.transport_context.request.path.endswith("/stale")
    return AbortResult(reason="quote_withdrawn") if stale else None


async def book(context: SettleResultContext) -> None:
    if context.result.success:  # a serve-first settlement that was lost comes here too, unsuccessful
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
        hooks=SellerHooks()
        .on_before_verify(refuse_blocked)
        .on_before_settle(withdraw_stale_quotes)
        .on_after_settle(book),
        routes=[
            PricedRoute("GET", "/report/{item}", price="$0.01"),
            # Serve-first takes atomic units ($0.01 of a 6-decimal USDC), so its exposure is known at start.
            PricedRoute("GET", "/quote/{item}", amount=10_000, settlement="serve-first", fallback_to_hold=False),
        ],
        # What this seller risks serving before it is paid, in atomic units.
        serve_first_max_price=10_000,
        serve_first_max_per_buyer=50_000,
        serve_first_max_total=1_000_000,
        store="seller.sqlite",
    ),
)
