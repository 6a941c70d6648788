"""The demo's seller: a FastAPI app with priced routes behind the escrow middleware (hold, and serve-first quotes)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

if TYPE_CHECKING:  # the keyless seller (and its httpx) is imported only by a shop that uses it
    from escrow_py.seller import FacilitatorSellerConfig

REPORT_PRICE = 10_000  # 0.01 USDC
STUCK_PRICE = 20_000
QUOTE_PRICE = 2_000  # a cheap, instant answer: served first, settled in batches
# Short enough that story 3 waits seconds, not minutes; above SellerConfig.min_time_left.
STUCK_TIMEOUT = 20


# What a serve-first demo shop risks before its settlements land (SellerConfig.serve_first_*).
SERVE_FIRST_LIMITS = {
    "serve_first_max_price": REPORT_PRICE,
    "serve_first_max_per_buyer": 50 * REPORT_PRICE,
    "serve_first_max_total": 500 * REPORT_PRICE,
}


def routes(settlement: str = "hold") -> list[PricedRoute]:
    """The demo's routes; with settlement="serve-first" the cheap ones (report, fail) serve first
    (the config then needs SERVE_FIRST_LIMITS)."""
    return [
        PricedRoute(
            "GET", "/report/{item}", amount=REPORT_PRICE, max_timeout_seconds=120, description="a report",
            settlement=settlement,
        ),
        PricedRoute(
            "GET", "/fail", amount=REPORT_PRICE, max_timeout_seconds=120, description="a broken upstream",
            settlement=settlement,
        ),
        PricedRoute("GET", "/stuck", amount=STUCK_PRICE, max_timeout_seconds=STUCK_TIMEOUT, description="never ends"),
    ]  # fmt: skip


def quote_route() -> PricedRoute:
    """`/quote/{item}`: cheap and instant, so served first (the config needs SERVE_FIRST_LIMITS)."""
    return PricedRoute(
        "GET", "/quote/{item}", amount=QUOTE_PRICE, max_timeout_seconds=120, description="a quote",
        settlement="serve-first",
    )  # fmt: skip


def build_shop(config: SellerConfig | FacilitatorSellerConfig, *, work_seconds: float) -> FastAPI:
    """The app: `/report/{item}` works for `work_seconds` then answers; `/quote/{item}` answers at once;
    `/fail` raises; `/stuck` never answers.

    A SellerConfig sells with the operator key in this process; a FacilitatorSellerConfig through a facilitator.
    """
    app = FastAPI(title="x402-escrow demo shop")

    @app.get("/report/{item}")
    async def report(item: str) -> dict[str, Any]:
        await asyncio.sleep(work_seconds)  # the paid work: the window in which a buyer can die
        # generated_at shows that a replay returns the stored bytes, not a fresh rendering.
        return {"item": item, "summary": f"everything about {item}", "generated_at": time.time()}

    @app.get("/quote/{item}")
    async def quote(item: str) -> dict[str, Any]:
        return {"item": item, "price": f"{len(item) * 1.25:.2f}", "quoted_at": time.time()}

    @app.get("/fail")
    async def fail() -> dict[str, Any]:
        raise RuntimeError("the upstream data source is down")

    @app.get("/stuck")
    async def stuck() -> dict[str, Any]:
        await asyncio.Event().wait()  # an upstream that never answers: nothing is ever delivered
        raise AssertionError("unreachable")

    if isinstance(config, SellerConfig):
        app.add_middleware(EscrowMiddleware, config=config)
    else:
        from escrow_py.seller import FacilitatorMiddleware

        app.add_middleware(FacilitatorMiddleware, config=config)
    return app
