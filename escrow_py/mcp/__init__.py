"""Paid MCP tools: delivery-escrow over the x402 MCP transport (`pip install 'x402-escrow[mcp]'`).

Seller: price tools with `paid_tool(name, amount)` routes in a SellerConfig and run each call
through `PaidTools.call` from a low-level `mcp.server.lowlevel.Server`'s call_tool handler
(`request_meta(server)` gives the call's `_meta`). The seller middleware's machinery does the
rest: offer, verification, deposit before the tool runs, stored result, delivery poster,
instant refund when the tool fails (raise ToolError to say why), replay of a paid call.

Buyer: `EscrowToolClient(session, signer, rpc_url, journal).call_tool(name, arguments)` on an
initialized `mcp.ClientSession`; `await client.recover()` in a later session replays or
refunds what a dead agent left.

The delivery hash commits to the UTF-8 bytes of the result's one text item, the string the
MCP client decodes (`delivered_bytes`); the call is bound by its requestHash to
`POST mcp://tool/<name>` with `canonical_arguments(arguments)` as body (README, "Paid MCP tools").
"""

from __future__ import annotations

from escrow_py.mcp._client import EscrowToolClient, tool_request
from escrow_py.mcp._server import PaidTools, ToolError, ToolHandler, paid_tool, request_meta
from escrow_py.mcp._wire import canonical_arguments, delivered_bytes, result_text, tool_url

__all__ = [
    "EscrowToolClient",
    "PaidTools",
    "ToolError",
    "ToolHandler",
    "canonical_arguments",
    "delivered_bytes",
    "paid_tool",
    "request_meta",
    "result_text",
    "tool_request",
    "tool_url",
]
