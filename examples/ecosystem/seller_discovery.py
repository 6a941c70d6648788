"""A priced route described for x402 bazaar discovery (the SDK's bazaar extension in every 402).

`uvicorn examples.ecosystem.seller_discovery:app`; a facilitator or index that reads the 402 (or
the payment) decodes it with `x402.extensions.bazaar.validate_and_extract`.
"""

import os

from fastapi import FastAPI
from x402.extensions.bazaar import OutputConfig, declare_discovery_extension

from escrow_py.chain.signer import LocalSigner
from escrow_py.seller import EscrowMiddleware, PricedRoute, SellerConfig

app = FastAPI()


@app.get("/weather/{city}")
async def weather(city: str, units: str = "metric") -> dict[str, str | float]:
    return {"city": city, "units": units, "temperature": 21.5}


discovery = declare_discovery_extension(
    input={"units": "metric"},
    input_schema={"properties": {"units": {"type": "string", "enum": ["metric", "imperial"]}}},
    output=OutputConfig(
        example={"city": "Paris", "units": "metric", "temperature": 21.5},
        schema={"properties": {"temperature": {"type": "number"}}},
    ),
)
app.add_middleware(
    EscrowMiddleware,
    config=SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        pay_to=os.environ["SELLER_ADDRESS"],
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),
        routes=[
            PricedRoute(
                "GET",
                "/weather/{city}",
                price="$0.002",
                description="Current weather for a city",
                mime_type="application/json",
                discovery=discovery,  # + method, pathParams, routeTemplate and settlement "hold" per request
            )
        ],
        store="seller.sqlite",
    ),
)
