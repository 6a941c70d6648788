"""Paid MCP tools on the session's anvil, served by a real uvicorn over the MCP streamable HTTP transport."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fixtures.chain import Chain
from helpers import OPERATOR, SELLER, address, dev
from mcp import ClientSession, types
from mcp.client.streamable_http import streamablehttp_client
from mcp.server.fastmcp.server import StreamableHTTPASGIApp
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route

from escrow_devtools import harness
from escrow_py.mcp import PaidTools, ToolError, paid_tool, request_meta
from escrow_py.seller import SellerConfig

PRICE = 10_000
SLOW_TIMEOUT = 60  # the slow tool's maxTimeoutSeconds: the deadline a crash test travels past

# Tamper with the result the seller sends (a lying seller, or something between it and the buyer).
Tamper = Callable[[types.CallToolResult], types.CallToolResult]


@dataclass
class ToolShop:
    """A paid MCP server: its URL, the PaidTools behind it, how often each tool ran, the slow tool's gate."""

    url: str
    paid: PaidTools
    calls: dict[str, int] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)


def make_app(
    chain: Chain, store: Path, *, tamper: Tamper | None = None
) -> tuple[Starlette, PaidTools, dict[str, int], threading.Event]:
    config = SellerConfig(
        rpc_url=chain.node.url,
        escrow=chain.escrow.address,
        token=chain.token.address,
        network="eip155:84532",
        pay_to=address(SELLER),
        operator=dev(OPERATOR),
        routes=[
            paid_tool("score", PRICE),
            paid_tool("slow", PRICE, max_timeout_seconds=SLOW_TIMEOUT),
            paid_tool("fail", PRICE),
        ],
        store=store,
        poster_interval=0.2,
    )
    paid = PaidTools(config)
    calls: dict[str, int] = {}
    gate = threading.Event()

    async def score(arguments: dict[str, Any]) -> object:
        return {"item": arguments.get("item"), "note": "été ✓", "score": 7}

    async def slow(arguments: dict[str, Any]) -> object:
        # Waits for the test to open the gate (or gives up after a while, so the server can stop).
        await asyncio.to_thread(gate.wait, 120)
        return f"slow result for {arguments.get('item')}"

    async def fail(arguments: dict[str, Any]) -> object:
        raise ToolError("the tool could not score this")

    async def free(arguments: dict[str, Any]) -> object:
        return "free of charge"

    tools: dict[str, Callable[[dict[str, Any]], Awaitable[object]]] = {
        "score": score,
        "slow": slow,
        "fail": fail,
        "free": free,
    }
    server: Server[Any, Any] = Server("test-shop")

    @server.list_tools()  # type: ignore[no-untyped-call, untyped-decorator]
    async def list_tools() -> list[types.Tool]:
        schema = {"type": "object", "properties": {"item": {"type": "string"}}}
        return [types.Tool(name=name, inputSchema=schema) for name in tools]

    @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        calls[name] = calls.get(name, 0) + 1
        result = await paid.call(name, arguments, _counted(name, tools[name], calls), meta=request_meta(server))
        return tamper(result) if tamper is not None else result

    sessions = StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions.run(), paid.running():
            yield

    app = Starlette(routes=[Route("/mcp", StreamableHTTPASGIApp(sessions))], lifespan=lifespan)
    calls.clear()
    return app, paid, calls, gate


def _counted(
    name: str, handler: Callable[[dict[str, Any]], Awaitable[object]], calls: dict[str, int]
) -> Callable[[dict[str, Any]], Awaitable[object]]:
    """The tool, counting runs of its body under `ran:<name>` (calls counts every request)."""

    async def run(arguments: dict[str, Any]) -> object:
        calls[f"ran:{name}"] = calls.get(f"ran:{name}", 0) + 1
        return await handler(arguments)

    return run


@contextlib.contextmanager
def tool_shop(chain: Chain, store: Path, *, tamper: Tamper | None = None) -> Iterator[ToolShop]:
    app, paid, calls, gate = make_app(chain, store, tamper=tamper)
    with harness.serving(app, stop_timeout=30) as running:
        try:
            yield ToolShop(f"{running.url}/mcp", paid, calls, gate)
        finally:
            gate.set()  # a slow tool still waiting returns, so the server can stop


@pytest.fixture
def shop(chain: Chain, tmp_path: Path) -> Iterator[ToolShop]:
    with tool_shop(chain, tmp_path / "seller.sqlite") as running:
        yield running


@contextlib.asynccontextmanager
async def mcp_session(url: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session over streamable HTTP."""
    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        yield session
