"""How a paid MCP tool call maps onto the delivery-escrow exchange, for the seller and the buyer alike.

A tool call is priced, hashed, journaled and replayed as the request

    POST mcp://tool/<name>      body = canonical_arguments(arguments)

so the seller middleware's verify/deposit/store/poster code and the buyer's journal, policy and
`recover()` serve tool calls unchanged. The x402 MCP transport (the SDK's `x402.mcp`
conventions) carries what HTTP carries in headers:

- unpaid call: a tool result with `isError: true` and `structuredContent` = the PaymentRequired
  (its `content[0].text` is the same JSON);
- paid call: the PaymentPayload at `params._meta["x402/payment"]`;
- answer: the tool's content plus `_meta["x402/payment-response"]` = the SettleResponse, whose
  `extra.deliveryHash` is keccak256 of `delivered_bytes(result)`: the UTF-8 bytes of the result's
  one text item, exactly the string the MCP client decodes from the JSON-RPC message;
- the seller's own failure (HTTP's 503): `isError: true`, `structuredContent` =
  `{"error": reason, "message": ..., "retryAfter": seconds}`; send the same payment again.

`to_tool_result` (seller) and `to_http_response` (buyer) are the two directions of that mapping.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import httpx
from mcp import types
from x402.mcp import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY
from x402.schemas import PaymentRequired, SettleResponse

from escrow_py.protocol.errors import ConfigError, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import canonical_url
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    UNAVAILABLE_STATUS,
    Unavailable,
    decode_payment_required,
    decode_payment_response,
    encode_payment_required,
    encode_payment_response,
)

# The request a tool call stands for (the SDK's resource URL for a tool is mcp://tool/<name>).
TOOL_METHOD = "POST"
TOOL_SCHEME = "mcp"
TOOL_HOST = "tool"

# MCP tool names (the spec's SHOULD): they go into a URL path as they are, never percent-encoded.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# The seller's own failure, in structuredContent: how long to wait before sending the same payment again.
RETRY_AFTER_KEY = "retryAfter"

__all__ = [
    "MCP_PAYMENT_META_KEY",
    "MCP_PAYMENT_RESPONSE_META_KEY",
    "TOOL_METHOD",
    "canonical_arguments",
    "check_tool_name",
    "delivered_bytes",
    "payment_header_of",
    "payment_meta",
    "result_text",
    "to_http_response",
    "to_tool_result",
    "tool_name_of",
    "tool_path",
    "tool_url",
]


def check_tool_name(name: str) -> str:
    """`name` if it is an MCP tool name this scheme can price (1-128 of A-Z a-z 0-9 _ . -); else ConfigError."""
    if not isinstance(name, str) or _TOOL_NAME.match(name) is None:
        raise ConfigError(f"a paid tool's name must be 1-128 characters of A-Z a-z 0-9 _ . -, got {name!r}")
    return name


def tool_path(name: str) -> str:
    return "/" + check_tool_name(name)


def tool_url(name: str) -> str:
    """The resource URL of a tool, in canonical form: mcp://tool/<name>."""
    return canonical_url(f"{TOOL_SCHEME}://{TOOL_HOST}{tool_path(name)}")


def tool_name_of(url: str) -> str | None:
    """The tool a journaled request URL names; None for any other URL (an HTTP request)."""
    prefix = f"{TOOL_SCHEME}://{TOOL_HOST}/"
    if not url.startswith(prefix):
        return None
    name = url[len(prefix) :]
    return name if _TOOL_NAME.match(name) else None


def canonical_arguments(arguments: Mapping[str, Any] | None) -> bytes:
    """The request body a tool call's requestHash binds: its arguments as JSON, keys sorted at every
    level, no whitespace, non-ASCII as UTF-8 (not escaped), NaN and infinities refused.

    Both sides build it from the arguments object the JSON-RPC message carries, so a payment
    signed for one set of arguments cannot buy a call with another. Raises ValueError for
    arguments JSON cannot carry.
    """
    return json.dumps(
        dict(arguments or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def result_text(value: object) -> str:
    """The text a paid tool returns: a str as it is, anything else as compact JSON (non-ASCII kept)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def delivered_bytes(result: types.CallToolResult) -> bytes | None:
    """The bytes the delivery hash commits to: the UTF-8 encoding of the result's one text item.

    None when the result is not exactly one text item (then no committed hash can match it).
    """
    if len(result.content) != 1 or not isinstance(result.content[0], types.TextContent):
        return None
    try:
        return result.content[0].text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no byte string for it
        return None


def payment_meta(payment_header: str) -> dict[str, Any]:
    """The `_meta` of a paid call: the PaymentPayload (decoded from its header form) at x402/payment."""
    return {MCP_PAYMENT_META_KEY: json.loads(base64.b64decode(payment_header))}


def payment_header_of(meta: Mapping[str, Any] | None) -> str | None:
    """The payment a call's `_meta` carries, in the header form the seller middleware decodes; None: unpaid.

    Whatever is there is passed on as JSON: the middleware's decoder judges it (a value that is not
    a payment gets its 400 reason), so nothing is validated twice.
    """
    if not meta or MCP_PAYMENT_META_KEY not in meta:
        return None
    raw = json.dumps(meta[MCP_PAYMENT_META_KEY], separators=(",", ":"), default=str)
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def _text(value: str) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=value)]


def to_tool_result(status: int, headers: Mapping[str, str], body: bytes) -> types.CallToolResult:
    """The seller middleware's answer (status, headers, body) as the tool result the MCP client receives."""
    if (value := headers.get(PAYMENT_RESPONSE_HEADER.lower())) is not None:
        settle = decode_payment_response(value).model_dump(by_alias=True, exclude_none=True)
        text = body.decode("utf-8", errors="replace")
        return types.CallToolResult(
            content=_text(text), isError=status >= 400, _meta={MCP_PAYMENT_RESPONSE_META_KEY: settle}
        )
    if (value := headers.get(PAYMENT_REQUIRED_HEADER.lower())) is not None:
        required = decode_payment_required(value).model_dump(by_alias=True, exclude_none=True)
        return types.CallToolResult(content=_text(json.dumps(required)), structuredContent=required, isError=True)
    unavailable = Unavailable.decode(status, headers, body)
    if unavailable is not None:
        data = {
            "error": str(unavailable.reason),
            "message": unavailable.message,
            RETRY_AFTER_KEY: unavailable.retry_after,
        }
        return types.CallToolResult(content=_text(json.dumps(data)), structuredContent=data, isError=True)
    return types.CallToolResult(content=_text(body.decode("utf-8", errors="replace")), isError=True)


def to_http_response(result: types.CallToolResult) -> httpx.Response:
    """A tool result read back as the HTTP answer it stands for, for the buyer's core to judge.

    Raises ProtocolError when the x402 parts of the result do not decode.
    """
    meta = result.meta or {}
    structured = result.structuredContent
    if MCP_PAYMENT_RESPONSE_META_KEY in meta:
        try:
            settle = SettleResponse.model_validate(meta[MCP_PAYMENT_RESPONSE_META_KEY])
        except ValueError as exc:
            raise ProtocolError(
                Reason.INVALID_PAYMENT_RESPONSE, f"x402/payment-response does not decode: {exc}"
            ) from None
        body = delivered_bytes(result)
        return httpx.Response(
            500 if result.isError else 200,
            headers={PAYMENT_RESPONSE_HEADER: encode_payment_response(settle)},
            content=b"" if body is None else body,
        )
    if result.isError and isinstance(structured, dict) and "accepts" in structured:
        try:
            required = PaymentRequired.model_validate(structured)
        except ValueError as exc:
            raise ProtocolError(
                Reason.INVALID_PAYMENT_REQUIRED, f"the tool's PaymentRequired does not decode: {exc}"
            ) from None
        return httpx.Response(402, headers={PAYMENT_REQUIRED_HEADER: encode_payment_required(required)}, content=b"")
    if result.isError and isinstance(structured, dict) and RETRY_AFTER_KEY in structured:
        body = json.dumps({"error": structured.get("error"), "message": structured.get("message")}).encode()
        retry_after = structured.get(RETRY_AFTER_KEY)
        headers = {"retry-after": str(retry_after) if isinstance(retry_after, int) else "1"}
        return httpx.Response(UNAVAILABLE_STATUS, headers=headers, content=body)
    body = delivered_bytes(result)
    return httpx.Response(500 if result.isError else 200, content=b"" if body is None else body)
