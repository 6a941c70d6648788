"""A paid MCP tool over streamable HTTP: `python examples/mcp_server.py` serves http://127.0.0.1:8001/mcp."""

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from mcp import types
from mcp.server.fastmcp.server import StreamableHTTPASGIApp
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route

from escrow_py.chain.signer import LocalSigner
from escrow_py.mcp import PaidTools, ToolError, paid_tool, request_meta
from escrow_py.seller import SellerConfig

paid = PaidTools(
    SellerConfig(
        rpc_url=os.environ["X402_ESCROW_RPC_URL"],
        network="eip155:84532",  # Base Sepolia
        escrow=os.environ["X402_ESCROW_ADDRESS"],
        token=os.environ.get("X402_ESCROW_TOKEN", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),  # USDC
        pay_to=os.environ["SELLER_ADDRESS"],  # receives the payments
        operator=LocalSigner.from_env("SELLER_OPERATOR_KEY"),  # pays gas for deposit, deliver, refund
        routes=[paid_tool("score", amount=10_000, max_timeout_seconds=120)],  # 0.01 USDC a call
        store="mcp_seller.sqlite",
    )
)


async def score(arguments: dict[str, Any]) -> dict[str, Any]:
    item = arguments.get("item")
    if not isinstance(item, str) or not item:
        raise ToolError("item must be a non-empty string")  # the buyer is refunded at once
    return {"item": item, "score": sum(map(ord, item)) % 100}  # sent as compact JSON text


server: Server[Any, Any] = Server("shop")


@server.list_tools()
async def list_tools() -> list[types.Tool]:
    schema = {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}
    return [types.Tool(name="score", description="Score an item (0.01 USDC a call)", inputSchema=schema)]


@server.call_tool(validate_input=False)
async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
    return await paid.call(name, arguments, score, meta=request_meta(server))


sessions = StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with sessions.run(), paid.running():  # the MCP sessions, and the seller's delivery poster
        yield


app = Starlette(routes=[Route("/mcp", StreamableHTTPASGIApp(sessions))], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8001")))
