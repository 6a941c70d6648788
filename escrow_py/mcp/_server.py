"""Paid MCP tools: the seller middleware's whole delivery-escrow flow, driven by a tool call instead of HTTP.

A call to a priced tool becomes the request `POST mcp://tool/<name>` with its canonical arguments
as the body, handed to an `EscrowMiddleware` whose wrapped app runs the tool. So a tool call gets
exactly what an HTTP route gets, from the same code: the 402 offer bound to this call (requestHash
over tool and arguments), off-chain and on-chain verification, the deposit before the tool runs,
the result stored under the escrow id and its delivery hash queued for the poster, an instant
refund when the tool fails, and the stored bytes again when the same payment is sent again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx
from mcp import types
from mcp.server.lowlevel import Server
from starlette.types import Message, Receive, Scope, Send
from web3 import Web3

from escrow_py.mcp._wire import (
    TOOL_HOST,
    TOOL_METHOD,
    TOOL_SCHEME,
    canonical_arguments,
    check_tool_name,
    payment_header_of,
    result_text,
    to_tool_result,
    tool_path,
)
from escrow_py.protocol.errors import ConfigError, EscrowError
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER
from escrow_py.seller._config import PricedRoute, SellerConfig
from escrow_py.seller._middleware import EscrowMiddleware
from escrow_py.seller._startup import check_chain

log = logging.getLogger("escrow_py.mcp")

# A tool: its arguments in, its result out (a str is sent as it is, anything else as compact JSON).
ToolHandler = Callable[[dict[str, Any]], Awaitable[object]]

# Where the call rides through the middleware to the wrapped app (ASGI scope extensions).
_CALL = "x402_escrow.tool_call"


class ToolError(EscrowError):
    """A paid tool's own failure: the buyer is refunded at once and sees this message."""


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    arguments: dict[str, Any]
    handler: ToolHandler


def paid_tool(name: str, amount: int, *, max_timeout_seconds: int = 120, description: str = "") -> PricedRoute:
    """The priced route of a tool, for SellerConfig.routes: `amount` atomic units per call."""
    return PricedRoute(
        TOOL_METHOD,
        tool_path(name),
        amount=amount,
        max_timeout_seconds=max_timeout_seconds,
        description=description,
        mime_type="text/plain",
    )


class PaidTools:
    """Sells MCP tools for delivery-escrow payments (DESIGN.md section 10).

        paid = PaidTools(SellerConfig(..., routes=[paid_tool("score", amount=10_000)]))
        server = Server("shop")

        @server.call_tool(validate_input=False)
        async def call_tool(name: str, arguments: dict) -> types.CallToolResult:
            return await paid.call(name, arguments, TOOLS[name], meta=request_meta(server))

        async with paid.running():   # start-up checks, and the delivery poster while it runs
            ...serve the MCP server...

    A tool without a priced route runs free. `seller` is the EscrowMiddleware doing the work:
    its store, chain and poster are the ones an HTTP seller has (`await paid.seller.poster.flush()`).
    """

    def __init__(self, config: SellerConfig, *, w3: Web3 | None = None) -> None:
        if config.public_base_url is not None:
            raise ConfigError("PaidTools prices mcp://tool/<name>: SellerConfig.public_base_url must be None")
        for route in config.routes:
            if route.method != TOOL_METHOD or route.path != tool_path(route.path.removeprefix("/")):
                raise ConfigError(
                    f"PaidTools routes come from paid_tool(name, amount), got {route.method} {route.path}"
                )
        self.seller = EscrowMiddleware(_run_tool, config, w3=w3)

    def is_priced(self, name: str) -> bool:
        return self.seller.config.route_for(TOOL_METHOD, "/" + name) is not None

    async def call(
        self, name: str, arguments: Mapping[str, Any] | None, handler: ToolHandler, *, meta: Mapping[str, Any] | None
    ) -> types.CallToolResult:
        """Run one tool call under its price: the 402 offer, or the paid result with its x402/payment-response."""
        args = dict(arguments or {})
        if not self.is_priced(name):
            return types.CallToolResult(content=[types.TextContent(type="text", text=result_text(await handler(args)))])
        check_tool_name(name)
        try:
            body = canonical_arguments(args)
        except ValueError as exc:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=f"arguments cannot be priced: {exc}")], isError=True
            )
        headers = [(b"host", TOOL_HOST.encode())]
        if (header := payment_header_of(meta)) is not None:
            headers.append((PAYMENT_SIGNATURE_HEADER.lower().encode(), header.encode("ascii")))
        path = tool_path(name)
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": TOOL_METHOD,
            "scheme": TOOL_SCHEME,
            "path": path,
            "raw_path": path.encode("ascii"),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "server": None,
            "client": None,
            "extensions": {_CALL: _Call(name, args, handler)},
        }
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 500
        response_headers = httpx.Headers()
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for key, value in message.get("headers", []):
                    response_headers[bytes(key).decode("latin-1")] = bytes(value).decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self.seller(scope, receive, send)
        return to_tool_result(status, response_headers, b"".join(chunks))

    async def start(self) -> None:
        """What an HTTP seller does when its app starts: the start-up checks, then the delivery poster."""
        if self.seller.config.startup_checks:
            await anyio.to_thread.run_sync(check_chain, self.seller.config, self.seller.chain)
        self.seller.poster.start()

    async def stop(self) -> None:
        """Stop the poster after one last pass (nothing queued waits for the next start)."""
        await self.seller.poster.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[PaidTools]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()


def request_meta(server: Server[Any, Any]) -> dict[str, Any]:
    """The `_meta` of the tool call a low-level MCP Server is handling now (where x402/payment rides)."""
    meta = server.request_context.meta
    return meta.model_dump(by_alias=True, exclude_none=True) if meta is not None else {}


async def _run_tool(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the middleware: run the tool the call names and answer its text as UTF-8."""
    call: _Call = scope["extensions"][_CALL]
    try:
        text = result_text(await call.handler(call.arguments))
        body, status = text.encode("utf-8"), 200
    except ToolError as exc:
        body, status = str(exc).encode("utf-8", errors="replace"), 500
    except (UnicodeEncodeError, ValueError, TypeError) as exc:  # a result with no UTF-8 or JSON form
        log.warning("tool %s returned a result that cannot be sent: %s", call.name, exc)
        body, status = b"the tool's result has no UTF-8 text form", 500
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
